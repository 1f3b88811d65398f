// Host glue shared by the CUDA and the emulator bindings of the sparse-attention kernels: the
// shared argument checks (common/attn_host.h), the device-specific ones (dtype, head_dim, 16-byte
// aligned rows), empty inputs, allocation, params filling; only the launcher differs.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "common/attn_host.h"
#include "cuda/attention/attn_params.h"
#include "cuda/common/torch_glue.h"

namespace lt::attn {

inline void check_device_dtype(const char* op, const at::Tensor& q) {
  const auto dt = q.scalar_type();
  LT_CHECK(op, dt == at::kHalf || dt == at::kBFloat16,
           "q must be float16 or bfloat16 on this device (float32 / float64 run on the CPU kernel), got ", dt);
}

inline void check_device_args(const char* op, const AttnArgs& a) {
  LT_CHECK(op, attn_head_dim_ok(a.d), "head_dim must be one of ", attn_head_dims_str(), " on this device, got ", a.d);
  LT_CHECK(op, a.batch <= 65535, "the batch (number of sequences) must be <= 65535 on this device, got ", a.batch);
  LT_CHECK(op, a.heads <= 65535, "the number of heads must be <= 65535 on this device, got ", a.heads);
  const int64_t tiles = (std::max(a.nq, a.nk) + kAttnMinTile - 1) / kAttnMinTile;
  LT_CHECK(op, tiles <= std::numeric_limits<int32_t>::max(), "the sequence is too long for this device's grid (",
           std::max(a.nq, a.nk), " rows)");
}

// Unit stride in the last dim, every other stride a multiple of 8 elements (16 bytes) and a
// 16-byte aligned base (cp.async / vector loads); otherwise a contiguous copy.
inline at::Tensor rows_aligned16(const at::Tensor& t) {
  bool ok = t.dim() == 0 || t.stride(-1) == 1;
  ok = ok && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; ok && i + 1 < t.dim(); ++i) ok = t.size(i) == 1 || t.stride(i) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

inline int64_t span_of(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t s = 1;
  for (int64_t i = 0; i < t.dim(); ++i) s += (t.size(i) - 1) * t.stride(i);
  return s;
}

// (batch, token, head) strides of a batched (B, N, H, D) or packed (T, H, D) tensor.
inline void bth_strides(const AttnArgs& a, const at::Tensor& t, int64_t& sb, int64_t& st, int64_t& sh) {
  if (a.varlen) {
    sb = 0;
    st = t.stride(0);
    sh = t.stride(1);
  } else {
    sb = t.stride(0);
    st = t.stride(1);
    sh = t.stride(2);
  }
}

inline AttnFwdParams base_params(const AttnArgs& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  AttnFwdParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  bth_strides(a, q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  bth_strides(a, k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  bth_strides(a, v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  p.q_span = span_of(q);
  p.k_span = span_of(k);
  p.v_span = span_of(v);
  if (a.varlen) {
    p.cu_q = a.cu_q_dev.data_ptr<int64_t>();
    p.cu_k = a.cu_k_dev.data_ptr<int64_t>();
  }
  if (a.kpm.defined()) {
    p.kpm = a.kpm.data_ptr<uint8_t>();
    p.kpm_span = a.kpm.numel();
  }
  p.batch = a.batch;
  p.nq = a.nq;
  p.nk = a.nk;
  p.total_q = a.total_q;
  p.total_k = a.total_k;
  p.mask = a.mask;
  p.hm = a.hm();
  p.d = a.d;
  p.scale = static_cast<float>(a.scale);
  p.softcap = static_cast<float>(a.softcap);
  p.dtype = to_dtype(q);
  return p;
}

inline void set_lse(const AttnArgs& a, AttnFwdParams& p, const at::Tensor& lse) {
  // lse is contiguous: (B, H, Nq) or (H, Tq)
  p.lse_batch_stride = a.varlen ? 0 : int64_t(a.heads) * a.nq;
  p.lse_head_stride = a.varlen ? a.total_q : a.nq;
  p.l_span = lse.numel();
}

template <class Launch>
std::tuple<at::Tensor, at::Tensor> attn_fwd_device(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                   const std::optional<at::Tensor>& kpm,
                                                   const std::optional<at::Tensor>& cu_q,
                                                   const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                                                   double scale, const MaskSpec& mask, double softcap,
                                                   Launch&& launch) {
  const char* op = "sparse_attention_fwd";
  check_device_dtype(op, q_);
  const at::Tensor q = last_dim_contiguous(q_), k = last_dim_contiguous(k_), v = last_dim_contiguous(v_);
  const AttnArgs a =
      check_attn_args(op, q, k, v, kpm, cu_q, cu_k, max_q, max_k, scale, mask, /*allow_f64=*/false, softcap);
  check_device_args(op, a);
  at::Tensor out = empty_out(a, q), lse = empty_lse(a, q);
  if (out.numel() == 0) return {out, lse};
  if (a.total_k == 0) {  // no key anywhere: every row sees nothing
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const at::Tensor qa = rows_aligned16(q), ka = rows_aligned16(k), va = rows_aligned16(v);
  AttnFwdParams p = base_params(a, qa, ka, va);
  p.out = out.data_ptr();
  bth_strides(a, out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.o_span = out.numel();
  p.lse = lse.data_ptr<float>();
  set_lse(a, p, lse);
  launch(p);
  return {out, lse};
}

template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd_device(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, double scale, const MaskSpec& mask,
    double softcap, Launch&& launch) {
  const char* op = "sparse_attention_bwd";
  check_device_dtype(op, q_);
  const at::Tensor q = last_dim_contiguous(q_), k = last_dim_contiguous(k_), v = last_dim_contiguous(v_);
  const AttnArgs a =
      check_attn_args(op, q, k, v, kpm, cu_q, cu_k, max_q, max_k, scale, mask, /*allow_f64=*/false, softcap);
  check_device_args(op, a);
  check_bwd_tensors(op, a, q, grad_out, out, lse);
  const auto cf = at::MemoryFormat::Contiguous;
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(cf));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(cf));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(cf));
  if (a.total_q == 0 || a.total_k == 0) {  // nothing attends: all gradients are 0
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor qa = rows_aligned16(q), ka = rows_aligned16(k), va = rows_aligned16(v);
  const at::Tensor oa = rows_aligned16(out), ga = rows_aligned16(grad_out);
  const at::Tensor lc = lse.contiguous();
  at::Tensor dsum = at::empty(lc.sizes(), lc.options());
  at::Tensor dq_acc = at::zeros(q.sizes(), q.options().dtype(at::kFloat).memory_format(cf));
  AttnBwdParams p;
  static_cast<AttnFwdParams&>(p) = base_params(a, qa, ka, va);
  p.out = const_cast<void*>(oa.data_ptr());
  bth_strides(a, oa, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.o_span = span_of(oa);
  p.dout = ga.data_ptr();
  bth_strides(a, ga, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  p.do_span = span_of(ga);
  p.lse = const_cast<float*>(lc.data_ptr<float>());
  set_lse(a, p, lc);
  p.dsum = dsum.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_acc = dq_acc.data_ptr<float>();
  bth_strides(a, dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  bth_strides(a, dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  p.dq_span = dq.numel();
  p.dk_span = dk.numel();
  launch(p);
  return {dq, dk, dv};
}

}  // namespace lt::attn
