// Schemas of the emulated CUDA kernels (torch.ops.longtune_emu.*): the same signatures as
// torch.ops.longtune.*, implemented on CPU tensors by running the CUDA device code on the
// emulator. Test-only; built when LONGTUNE_EMU=ON (the default).
#include <torch/library.h>

#include <c10/util/Exception.h>

#include <optional>

#include "common/op_schemas.h"
#include "emu/runtime.h"

namespace {
// The emulator's grid cap (see emu::grid_cap): a block count >= 0 (0: no cap) or None (the
// environment variable LONGTUNE_EMU_GRID_CAP decides); returns the previous setting.
std::optional<int64_t> set_grid_cap(std::optional<int64_t> max_blocks) {
  TORCH_CHECK(!max_blocks || *max_blocks >= 0,
              "longtune_emu.set_grid_cap: max_blocks must be a block count >= 0 (0: no cap) or None, got ",
              *max_blocks);
  const int64_t prev = lt::emu::set_grid_cap(max_blocks ? *max_blocks : -1);
  return prev < 0 ? std::nullopt : std::optional<int64_t>(prev);
}
}  // namespace

TORCH_LIBRARY(longtune_emu, m) {
#define LT_DEF(schema) m.def(schema)
  LT_FOR_EACH_SCHEMA(LT_DEF);
#undef LT_DEF
  // Deliberately wrong kernels (csrc/cuda/selftest/probes.cuh): each must raise the emulator's report.
  m.def("faulty_kernel(Tensor x, int which) -> Tensor");
  // Launch option of the emulated launchers (no tensors: one kernel for every backend).
  m.def("set_grid_cap(int? max_blocks) -> int?", &set_grid_cap);
}
