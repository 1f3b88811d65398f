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
