// Launch geometry shared by every kernel family: plain data (no torch, no CUDA types), computed once
// on the host and used by both the nvcc launchers (cuda/common/cuda_launch.cuh) and the emulator
// launchers (cuda/common/emu_glue.h).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "common/simt/types.h"

namespace lt {

struct LaunchCfg {
  simt::Dim3 grid, block;
  size_t smem = 0;  // dynamic shared memory, bytes
};

// Grid-stride kernels cap their grid's x extent here (every element is still visited).
constexpr int64_t kMaxGridX = int64_t(1) << 20;

// A launch-planning function's `grid_cap` when nothing lowers its own limits (the CUDA launchers);
// the emulated launchers pass the emulator's grid cap (emu::capped_grid) so that every block of a
// grid-stride kernel loops more than once.
constexpr int64_t kNoGridCap = INT64_MAX;

// Blocks needed for `work` items at `per_block` items a block, clamped to [1, max_blocks].
inline uint32_t grid_blocks(int64_t work, int64_t per_block, int64_t max_blocks) {
  return static_cast<uint32_t>(std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, max_blocks)));
}

}  // namespace lt
