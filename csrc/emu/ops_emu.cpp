// Schemas of the emulated CUDA kernels (torch.ops.longtune_emu.*): the same signatures as
// torch.ops.longtune.*, implemented on CPU tensors by running the CUDA device code on the
// emulator. Test-only; built when LONGTUNE_EMU=ON (the default).
#include <torch/library.h>

#include "common/op_schemas.h"

TORCH_LIBRARY(longtune_emu, m) {
#define LT_DEF(schema) m.def(schema)
  LT_FOR_EACH_SCHEMA(LT_DEF);
#undef LT_DEF
  // Deliberately wrong kernels (csrc/cuda/selftest/probes.cuh): each must raise the emulator's report.
  m.def("faulty_kernel(Tensor x, int which) -> Tensor");
}
