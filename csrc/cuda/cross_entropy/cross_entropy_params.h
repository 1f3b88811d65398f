// Launch parameters of the fused linear + cross-entropy kernels (plain data; no torch, no CUDA types),
// shared by the nvcc launcher (cross_entropy_launch.cu), the emulator launcher (cross_entropy_emu.cpp) and the host
// glue.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cuda/common/dtype.h"

namespace lt::cross_entropy {

// Tile sizes shared by the kernels (cross_entropy_kernel.cuh) and the host-side planning below.
constexpr int kBM = 64;        // rows of x per block
constexpr int kBN = 64;        // vocabulary columns per tile
constexpr int kBK = 32;        // hidden-dimension chunk staged in shared memory
constexpr int kThreads = 256;  // 8 warps
constexpr int kStatW = 4;      // partial state per (split, row): max, sum exp(z - max), z[target], sum z

struct FwdParams {
  const void* x = nullptr;          // [T, d], rows x_row_stride apart, unit inner stride, dtype
  const void* w = nullptr;          // [V, d], rows w_row_stride apart, unit inner stride, dtype
  const void* b = nullptr;          // [V] or nullptr
  const int64_t* target = nullptr;  // [T]
  float* part = nullptr;            // [nsplit, T, kStatW] fp32 scratch
  float* loss = nullptr;            // [T]
  float* lse = nullptr;             // [T]
  int64_t* part_idx = nullptr;      // [nsplit, T] argmax of each (split, row)
  int64_t* argmax = nullptr;        // [T]
  const float* cw = nullptr;        // [V] fp32 class weights or nullptr
  const float* wsum = nullptr;      // [1] their sum (device scalar) or nullptr
  int64_t T = 0, d = 0, V = 0, ignore_index = -100;
  int64_t x_row_stride = 0, w_row_stride = 0;  // elements
  float eps = 0, z_loss = 0, softcap = 0;
  int64_t nsplit = 1, tiles_per_split = 1;  // vocabulary splits of the forward grid
  DType dtype = DType::F32;
};

struct BwdParams {
  const float* grad = nullptr;      // [T] dL/dloss_t
  const void* x = nullptr;          // [T, d], rows x_row_stride apart (as in FwdParams)
  const void* w = nullptr;          // [V, d], rows w_row_stride apart
  const void* b = nullptr;          // [V] or nullptr
  const int64_t* target = nullptr;  // [T]
  const float* lse = nullptr;       // [T]
  const float* cw = nullptr;        // [V] fp32 class weights or nullptr
  const float* wsum = nullptr;      // [1] their sum (device scalar) or nullptr
  float* dx32 = nullptr;            // [T, d] fp32 accumulator, rows dx_row_stride apart (zeroed; == dx for fp32)
  float* dw32 = nullptr;            // [V, d] fp32 accumulator, rows dw_row_stride apart (zeroed; == dw for fp32)
  float* db32 = nullptr;            // [V] fp32 accumulator (zeroed) or nullptr without bias
  void* dx = nullptr;               // [T, d] dtype output (converted from dx32 unless fp32)
  void* dw = nullptr;               // [V, d]
  void* db = nullptr;               // [V] or nullptr
  int64_t T = 0, d = 0, V = 0, ignore_index = -100;
  int64_t x_row_stride = 0, w_row_stride = 0, dx_row_stride = 0, dw_row_stride = 0;  // elements
  float eps = 0, z_loss = 0, softcap = 0, filter = 0;
  DType dtype = DType::F32;
};

// Forward grid: row blocks x vocabulary splits, enough blocks to fill a large GPU (~1024) while
// keeping splits of whole tiles (no split is empty).
inline void plan_fwd(FwdParams& p) {
  const int64_t nrb = (p.T + kBM - 1) / kBM, nvt = (p.V + kBN - 1) / kBN;
  int64_t want = std::max<int64_t>(1, (1024 + nrb - 1) / nrb);
  want = std::min<int64_t>({want, nvt, 256});
  p.tiles_per_split = (nvt + want - 1) / want;
  p.nsplit = (nvt + p.tiles_per_split - 1) / p.tiles_per_split;
}

// nvcc-compiled launchers; return a CUDA error string or nullptr.
const char* launch_cross_entropy_fwd_cuda(const FwdParams& p, void* stream);
const char* launch_cross_entropy_bwd_cuda(const BwdParams& p, void* stream);

}  // namespace lt::cross_entropy
