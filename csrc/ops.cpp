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
}

// Self-test ops of the device-intrinsics layer (tests only): one warp's raw mma.sync / ldmatrix /
// shuffle results. CPU tensors run the probe kernels on the emulator, CUDA tensors on the GPU,
// so the two can be compared against the same PTX-documented tables.
TORCH_LIBRARY(longtune_test, m) {
  m.def("mma_probe(Tensor frags, int kind) -> Tensor");
  m.def("ldmatrix_probe(Tensor tile, Tensor rows, int nmat, bool trans) -> Tensor");
  m.def("shfl_probe(Tensor values, Tensor arg, int kind, int width) -> Tensor");
  // The sparse-attention mask math of csrc/common/attn_mask.h, exposed on the host: per row (cols:
  // per key column) the <= 2 visible index ranges as (n, 2, 2) int64 [[lo0, hi0], [lo1, hi1]]
  // (empty ranges are [0, 0]); with tile > 0, the tile ranges touched by rows/cols [i0, i1) as
  // (2, 2). Used by the FLOP counter (unmasked pairs) and by the mask tests.
  m.def("attention_mask_ranges(int nq, int nk, int head, int heads, bool causal, int s2_group_size, str s2_mode, "
        "int window_left, int window_right, int n_global, int q_offset, int kv_offset, bool cols, int i0, int i1, "
        "int tile) -> Tensor");
}

// A dummy module init so that `import longtune._C` loads the library (and runs the static
// TORCH_LIBRARY registrations above). Pattern from pytorch/extension-cpp.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
