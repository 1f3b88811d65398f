// Launch parameters of the fused linear + cross-entropy kernels (plain data; no torch, no CUDA types),
// shared by the nvcc launcher (cross_entropy_launch.cu), the emulator launcher (cross_entropy_emu.cpp) and the host
// glue.
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>

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
  float* logits = nullptr;          // one-pass: [T, V] fp32 scratch receiving the capped logits, or nullptr
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
  const float* logits = nullptr;    // one-pass: [T, V] the capped logits the forward stored (else recomputed)
  int64_t T = 0, d = 0, V = 0, ignore_index = -100;
  int64_t x_row_stride = 0, w_row_stride = 0, dx_row_stride = 0, dw_row_stride = 0;  // elements
  float eps = 0, z_loss = 0, softcap = 0, filter = 0;
  bool wgrad = true;  // false (weight_grad=False): no dW / dbias; dw32 / db32 / dw / db unused
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

// The one-pass forward + backward (linear_cross_entropy_fwd_bwd): `fwd` and `bwd` describe the whole
// problem (bwd.grad: the per-row loss weights; bwd.dx / dw / db: the dtype outputs the fp32
// accumulators are converted to at the end, nullptr to keep the fp32 accumulators as the result;
// fwd.part / part_idx hold onepass_part_entries (x kStatW) entries). The rows are taken `rows` at
// a time: the forward kernel stores the chunk's capped logits in `logits` ([rows, V] fp32), the merge
// kernel forms its lse / loss / argmax, and the backward kernel turns the stored logits into d logits
// and accumulates dx, dW and dbias (no logits recompute: 3 GEMMs instead of 4).
struct OnePassParams {
  FwdParams fwd;
  BwdParams bwd;
  float* logits = nullptr;
  int64_t rows = 0;
};

// The forward and backward parameters of the chunk of rows r0 .. r0 + n (pointers offset, T = n).
inline std::pair<FwdParams, BwdParams> onepass_chunk(const OnePassParams& op, int64_t r0, int64_t n) {
  FwdParams f = op.fwd;
  BwdParams b = op.bwd;
  const int64_t es = f.dtype == DType::F32 ? 4 : 2;
  f.x = static_cast<const char*>(f.x) + r0 * f.x_row_stride * es;
  f.target += r0;
  f.loss += r0;
  f.lse += r0;
  f.argmax += r0;
  f.logits = op.logits;
  f.T = n;
  plan_fwd(f);
  b.grad += r0;
  b.x = f.x;
  b.target = f.target;
  b.lse = f.lse;
  b.dx32 += r0 * b.dx_row_stride;
  b.logits = op.logits;
  b.T = n;
  return {f, b};
}

// Rows per chunk of the one-pass op: `env` (LT_LCE_DEVICE_ROWS) when > 0, else as many whole row
// blocks as keep the [rows, V] fp32 logits within kOnePassScratchBytes (at least one row block).
constexpr int64_t kOnePassScratchBytes = int64_t(256) << 20;
inline int64_t onepass_rows(int64_t T, int64_t V, int64_t env) {
  const int64_t auto_rows = std::max<int64_t>(kBM, kOnePassScratchBytes / (4 * std::max<int64_t>(V, 1)) / kBM * kBM);
  return std::max<int64_t>(1, std::min(T, env > 0 ? env : auto_rows));
}

// (split, row) entries of the forward's partial states over the chunks of `rows` rows of T: the
// larger of a whole chunk's and the last (shorter, possibly more split) chunk's.
inline int64_t onepass_part_entries(int64_t T, int64_t V, int64_t rows) {
  int64_t most = 0;
  for (const int64_t n : {std::min(rows, T), T % rows}) {
    if (n <= 0) continue;
    FwdParams f;
    f.T = n;
    f.V = V;
    plan_fwd(f);
    most = std::max(most, f.nsplit * n);
  }
  return most;
}

// nvcc-compiled launchers; return a CUDA error string or nullptr.
const char* launch_cross_entropy_fwd_cuda(const FwdParams& p, void* stream);
const char* launch_cross_entropy_bwd_cuda(const BwdParams& p, void* stream);
const char* launch_cross_entropy_fwd_bwd_cuda(const OnePassParams& p, void* stream);

}  // namespace lt::cross_entropy
