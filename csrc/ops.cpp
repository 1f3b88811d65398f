// The one TORCH_LIBRARY block: every longtune op schema, nothing else.
// Kernels register per backend with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda); the Python layer
// (python/longtune/ops) adds fake (meta) kernels, autograd and FLOP formulas.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(longtune, m) {
  // Fast Walsh-Hadamard transform over the last dimension: y = (x @ H_n) * scale, where
  // H_n = kron(H_m, H_{2^k}) (see csrc/common/hadamard_factors.h). Accumulates in fp32 (fp64 for
  // float64 input).
  m.def("hadamard_transform(Tensor x, float scale) -> Tensor");
  // The transposed transform, y = (g @ H_n^T) * scale: the backward of hadamard_transform.
  m.def("hadamard_transform_backward(Tensor grad, float scale) -> Tensor");

  // Rotated fake quantization (RoSTE): y = Q(R x) with R the orthonormal (block) Hadamard rotation
  // over the last dimension (blocks of hadamard_size; <= 0: the whole row) when `rotate`, and Q a
  // per-token / per-group, symmetric / asymmetric b-bit quantize-dequantize (csrc/common/quant.h).
  m.def("rotate_fake_quant(Tensor x, int bits, str granularity, int group_size, bool symmetric, "
        "float clip_ratio, bool rotate, int hadamard_size, str ste_mode) -> Tensor");
  // Straight-through backward: grad_x = R^T (mask * grad), mask = 1 (ste 'identity') or
  // "x's code was inside the code range" (ste 'clip').
  m.def("rotate_fake_quant_backward(Tensor grad, Tensor x, int bits, str granularity, int group_size, "
        "bool symmetric, float clip_ratio, bool rotate, int hadamard_size, str ste_mode) -> Tensor");
  // The integer side for export: (codes, scales, zeros); codes int8 (symmetric) or uint8
  // (asymmetric) with x's shape, scales / zeros float32 of shape x.shape[:-1] + [groups].
  m.def("rotate_quantize(Tensor x, int bits, str granularity, int group_size, bool symmetric, "
        "float clip_ratio, bool rotate, int hadamard_size) -> (Tensor, Tensor, Tensor)");
}

// Self-test ops of the device-intrinsics layer (tests only): one warp's raw mma.sync / ldmatrix /
// shuffle results. CPU tensors run the probe kernels on the emulator, CUDA tensors on the GPU,
// so the two can be compared against the same PTX-documented tables.
TORCH_LIBRARY(longtune_test, m) {
  m.def("mma_probe(Tensor frags, int kind) -> Tensor");
  m.def("ldmatrix_probe(Tensor tile, Tensor rows, int nmat, bool trans) -> Tensor");
  m.def("shfl_probe(Tensor values, Tensor arg, int kind, int width) -> Tensor");
}

// A dummy module init so that `import longtune._C` loads the library (and runs the static
// TORCH_LIBRARY registrations above). Pattern from pytorch/extension-cpp.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
