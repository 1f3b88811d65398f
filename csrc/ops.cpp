// The one TORCH_LIBRARY block: every longtune op schema, nothing else.
// Kernels register per backend with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda); the Python layer
// (python/longtune/ops) adds fake (meta) kernels, autograd and FLOP formulas.
#include <Python.h>
#include <torch/library.h>

#include "common/op_schemas.h"

TORCH_LIBRARY(longtune, m) {
  // every schema, documented in csrc/common/op_schemas.h
#define LT_DEF(schema) m.def(schema)
  LT_FOR_EACH_SCHEMA(LT_DEF);
#undef LT_DEF
  m.def(LT_SCHEMA_ATTN_MASK_RANGES);
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
