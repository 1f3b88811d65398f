// Launch parameters of the block-sparse flash-attention kernels (plain data; no torch, no CUDA types).
// Layouts (element strides; head_dim is unit-stride everywhere):
//   batched: q (B, Nq, Hq, D), k/v (B, Nk, Hkv, D), out (B, Nq, H, D), lse (B, H, Nq)
//   packed:  q (Tq, Hq, D),    k/v (Tk, Hkv, D),    out (Tq, H, D),    lse (H, Tq)   (batch strides 0)
// Element (b, token t, head h, d) of x lives at x + b*x_sb + (start_b + t)*x_st + h*x_sh + d, where
// start_b = cu_seqlens[b] (packed) or 0 (batched); lse / dsum at b*l_sb + h*l_sh + (start_b + t).
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/attn_mask.h"
#include "cuda/common/dtype.h"

namespace lt::attn {

struct AttnParams {
  // forward inputs / outputs (backward reuses q, k, v, out)
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;     // forward: written; backward: read (const)
  float* lse = nullptr;    // forward: written; backward: read
  // backward only
  const void* dout = nullptr;  // like out (own strides)
  void* dq = nullptr;          // (.., Hq, D) contiguous, q's dtype
  void* dk = nullptr;          // (.., Hkv, D) contiguous, k's dtype
  void* dv = nullptr;
  float* dq_acc = nullptr;     // fp32 scratch shaped like dq (contiguous), zero-initialised
  float* dsum = nullptr;       // fp32 scratch shaped like lse (same strides)
  // sequences
  const int64_t* cu_q = nullptr;  // packed: (B + 1) int64 offsets, else null
  const int64_t* cu_k = nullptr;
  const uint8_t* kpm = nullptr;   // batched: (B, Nk) uint8 (1 = keep) contiguous, or null
  int64_t batch = 0, nq = 0, nk = 0;  // nq / nk: lengths (batched) or longest sequence (packed)
  int64_t total_q = 0, total_k = 0;   // rows of q / k (batched: B*Nq, B*Nk)
  // strides in elements
  int64_t q_sb = 0, q_st = 0, q_sh = 0;
  int64_t k_sb = 0, k_st = 0, k_sh = 0;
  int64_t v_sb = 0, v_st = 0, v_sh = 0;
  int64_t o_sb = 0, o_st = 0, o_sh = 0;
  int64_t do_sb = 0, do_st = 0, do_sh = 0;
  int64_t g_sb = 0, g_st = 0, g_sh = 0;  // dq / dk / dv / dq_acc (contiguous, shaped like q / k)
  int64_t gk_sb = 0, gk_st = 0, gk_sh = 0;
  int64_t l_sb = 0, l_sh = 0;
  // element counts from each base pointer (the emulator's bounds checks)
  int64_t q_span = 0, k_span = 0, v_span = 0, o_span = 0, do_span = 0, l_span = 0, kpm_span = 0;
  int64_t dq_span = 0, dk_span = 0;
  MaskSpec mask;
  HeadMap hm;
  int32_t d = 0;
  float scale = 1.f;
  float softcap = 0.f;  // > 0: scores s (after scale) -> softcap * tanh(s / softcap); 0: off
  DType dtype = DType::F16;  // F16 or BF16
};

// Tile shape shared by the launchers and the kernel bodies: 4 warps, 16 query rows (forward) or
// 16 key rows (backward) per warp; shared-memory rows padded by 8 elements (16 bytes) so the 8 row
// addresses of one ldmatrix hit distinct banks.
constexpr int kBQ = 64, kBK = 64, kThreads = 128;
constexpr size_t attn_smem_row(int32_t d) { return static_cast<size_t>(d) + 8; }
// forward: Q tile + double-buffered K and V tiles
constexpr size_t attn_fwd_smem_bytes(int32_t d) { return (kBQ + 4 * kBK) * attn_smem_row(d) * 2; }
// backward: K, V tiles, double-buffered Q, dO tiles, dS^T (kBK x (kBQ + 8)), double-buffered lse
// and Dsum of the query tile
constexpr size_t attn_bwd_smem_bytes(int32_t d) {
  return (2 * kBK + 4 * kBQ) * attn_smem_row(d) * 2 + kBK * (kBQ + 8) * 2 + 4 * kBQ * sizeof(float);
}
constexpr bool attn_head_dim_ok(int64_t d) { return d == 64 || d == 80 || d == 96 || d == 128; }

// nvcc launchers (csrc/cuda/attention/*.cu): nullptr on success, else the CUDA error string.
const char* launch_attn_fwd_cuda(const AttnParams& p, void* stream);
const char* launch_attn_bwd_cuda(const AttnParams& p, void* stream);

}  // namespace lt::attn
