// Launch parameters of the block-sparse flash-attention kernels (plain data; no torch, no CUDA types).
// Layouts (element strides; head_dim is unit-stride everywhere):
//   batched: q (B, Nq, Hq, D), k/v (B, Nk, Hkv, D), out (B, Nq, H, D), lse (B, H, Nq)
//   packed:  q (Tq, Hq, D),    k/v (Tk, Hkv, D),    out (Tq, H, D),    lse (H, Tq)   (batch strides 0)
// Element (b, token t, head h, d) of x lives at
//   x + b * x_batch_stride + (start_b + t) * x_row_stride + h * x_head_stride + d,
// where start_b = cu_seqlens[b] (packed) or 0 (batched); lse / dsum at
//   b * lse_batch_stride + h * lse_head_stride + (start_b + t).
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/attn_mask.h"
#include "cuda/attention/attn_head_dims.h"
#include "cuda/common/dtype.h"

namespace lt::attn {

// Forward: q, k, v in; out, lse written.
struct AttnFwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;     // forward: written; backward: read (const)
  float* lse = nullptr;    // forward: written; backward: read
  // sequences
  const int64_t* cu_q = nullptr;  // packed: (B + 1) int64 offsets, else null
  const int64_t* cu_k = nullptr;
  const uint8_t* kpm = nullptr;   // batched: (B, Nk) uint8 (1 = keep) contiguous, or null
  int64_t batch = 0, nq = 0, nk = 0;  // nq / nk: lengths (batched) or longest sequence (packed)
  int64_t total_q = 0, total_k = 0;   // rows of q / k (batched: B*Nq, B*Nk)
  // strides in elements
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;  // lse and the backward's dsum
  // element counts from each base pointer (the emulator's bounds checks)
  int64_t q_span = 0, k_span = 0, v_span = 0, o_span = 0, l_span = 0, kpm_span = 0;
  MaskSpec mask;
  HeadMap hm;
  int32_t d = 0;
  float scale = 1.f;
  float softcap = 0.f;  // > 0: scores s (after scale) -> softcap * tanh(s / softcap); 0: off
  DType dtype = DType::F16;  // F16 or BF16
};

// Backward: the forward's tensors (out and lse read) plus dout in, dq / dk / dv written.
struct AttnBwdParams : AttnFwdParams {
  const void* dout = nullptr;  // like out (own strides)
  void* dq = nullptr;          // (.., Hq, D) contiguous, q's dtype
  void* dk = nullptr;          // (.., Hkv, D) contiguous, k's dtype
  void* dv = nullptr;
  float* dq_acc = nullptr;     // fp32 scratch shaped like dq (contiguous), zero-initialised
  float* dsum = nullptr;       // fp32 scratch shaped like lse (same strides)
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;  // dq and dq_acc (contiguous, like q)
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;  // dk and dv (contiguous, like k)
  int64_t do_span = 0, dq_span = 0, dk_span = 0;
};

// Threads per block of the flat (one thread per element) kernels: Dsum and the dq conversion. The
// tile shapes of the attention kernels are per head dim (attn_head_dims.h).
constexpr int kThreads = 128;

// nvcc launchers (csrc/cuda/attention/*.cu): nullptr on success, else the CUDA error string.
const char* launch_attn_fwd_cuda(const AttnFwdParams& p, void* stream);
const char* launch_attn_bwd_cuda(const AttnBwdParams& p, void* stream);

}  // namespace lt::attn
