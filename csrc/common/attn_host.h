// Host-side argument handling of the sparse-attention ops, shared by the CPU, CUDA and emulator
// bindings: the same checks (every message names the argument), the same shapes, the same MaskSpec.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "common/attn_mask.h"
#include "common/checks.h"

namespace lt::attn {

struct AttnArgs {
  bool varlen = false;
  int64_t batch = 0;
  int64_t nq = 0, nk = 0;            // batched: the lengths; packed: the longest sequence
  int64_t total_q = 0, total_k = 0;  // packed: rows of q / k
  int32_t hq = 0, hkv = 0, heads = 0, d = 0;
  std::vector<int64_t> cu_q, cu_k;   // packed: host copies of cu_seqlens_q / _k
  at::Tensor cu_q_dev, cu_k_dev;     // packed: int64 contiguous on q's device
  at::Tensor kpm;                    // batched with padding: (B, nk) uint8 contiguous on q's device
  MaskSpec mask;
  double scale = 1.0;
  double softcap = 0.0;  // > 0: scores s -> softcap * tanh(s / softcap); 0: off
  HeadMap hm() const { return HeadMap{hq, hkv, heads}; }
  int64_t q_start(int64_t b) const { return varlen ? cu_q[b] : 0; }
  int64_t k_start(int64_t b) const { return varlen ? cu_k[b] : 0; }
  int64_t q_len(int64_t b) const { return varlen ? cu_q[b + 1] - cu_q[b] : nq; }
  int64_t k_len(int64_t b) const { return varlen ? cu_k[b + 1] - cu_k[b] : nk; }
};

// The `int[] mask` argument (the MaskSlot encoding of attn_mask.h) -> MaskSpec, every field checked
// once here. shift_from depends on the number of heads and is set by check_attn_args.
inline MaskSpec parse_mask(const char* op, at::IntArrayRef enc) {
  LT_CHECK(op, enc.size() == size_t(kMaskLen) && enc[kVersion] == kMaskVersion, "mask must be the ", kMaskLen,
           "-integer encoding of version ", kMaskVersion, " (longtune.AttentionMask(...).to_list()), got ", enc);
  MaskSpec m;
  const int64_t causal = enc[kCausal], group = enc[kGroup], mode = enc[kMode];
  LT_CHECK(op, causal == 0 || causal == 1, "mask: causal must be 0 or 1, got ", causal);
  m.causal = causal == 1;
  LT_CHECK(op, mode >= 0 && mode <= 2, "mask: s2_mode must be 0 ('none'), 1 ('leakfree') or 2 ('longlora_roll'), got ",
           mode);
  m.mode = static_cast<S2Mode>(mode);
  if (m.mode != S2Mode::None) {
    LT_CHECK(op, group >= 2 && group % 2 == 0,
             "mask: s2_group_size must be an even number >= 2 (the shift is half a group), got ", group);
  } else {
    LT_CHECK(op, group == 0, "mask: s2_group_size=", group,
             " needs s2_mode 'leakfree' or 'longlora_roll' (got 'none')");
  }
  m.group = group;
  const int64_t wl = enc[kWindowLeft], wr = enc[kWindowRight];
  LT_CHECK(op, wl < 0 || wl >= 1, "mask: window (left) must be >= 1 (or unbounded), got ", wl);
  LT_CHECK(op, wr < 0 || wr >= 1, "mask: window (right) must be >= 1 (or unbounded), got ", wr);
  m.window_left = wl < 0 ? -1 : wl;
  m.window_right = wr < 0 ? -1 : wr;
  m.n_global = enc[kNGlobal];
  LT_CHECK(op, m.n_global >= 0, "mask: n_global must be >= 0, got ", m.n_global);
  m.q_offset = enc[kQOffset] < 0 ? -1 : enc[kQOffset];
  m.kv_offset = enc[kKvOffset];
  m.head_offset = enc[kHeadOffset];
  m.total_heads = enc[kTotalHeads];
  LT_CHECK(op, m.head_offset >= 0, "mask: head_offset must be >= 0, got ", m.head_offset);
  LT_CHECK(op, m.total_heads >= 0, "mask: total_heads must be >= 0 (0: the local heads), got ", m.total_heads);
  LT_CHECK(op, m.total_heads > 0 || m.head_offset == 0, "mask: head_offset=", m.head_offset,
           " needs total_heads (the global number of heads)");
  if (m.mode == S2Mode::Roll) {
    LT_CHECK(op, m.window_left < 0 && m.window_right < 0 && m.n_global == 0 && m.kv_offset == 0 && m.q_offset <= 0,
             "s2_mode='longlora_roll' reproduces LongLoRA's torch.roll formulation and takes no window, n_global or "
             "offsets (use 'leakfree')");
  }
  return m;
}

inline std::vector<int64_t> check_cu(const char* op, const char* name, const at::Tensor& cu, int64_t total,
                                     const at::Tensor& q) {
  check_same_device(op, name, cu, "q", q);
  LT_CHECK(op, cu.dim() == 1 && (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong), name,
           " must be a 1-D int32 or int64 tensor, got ", cu.scalar_type(), " with shape ", cu.sizes());
  LT_CHECK(op, cu.numel() >= 2, name, " must hold at least 2 offsets (batch + 1), got ", cu.numel());
  const at::Tensor h = cu.to(at::kCPU, at::kLong).contiguous();  // one device sync on CUDA
  std::vector<int64_t> v(h.data_ptr<int64_t>(), h.data_ptr<int64_t>() + h.numel());
  LT_CHECK(op, v.front() == 0, name, "[0] must be 0, got ", v.front());
  for (size_t i = 1; i < v.size(); ++i)
    LT_CHECK(op, v[i] >= v[i - 1], name, " must be non-decreasing, got ", name, "[", i - 1, "]=", v[i - 1], " > ", name,
             "[", i, "]=", v[i]);
  LT_CHECK(op, v.back() == total, name, "[-1] must equal the number of packed rows (", total, "), got ", v.back());
  return v;
}

// q, k, v must already have a unit stride in their last dimension (see last_dim_contiguous).
inline AttnArgs check_attn_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& cu_q,
                                const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, double scale,
                                const MaskSpec& mask, bool allow_f64, double softcap = 0.0) {
  check_floating(op, "q", q, allow_f64);
  LT_CHECK(op, k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
           "q, k and v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
           v.scalar_type());
  check_same_device(op, "q", q, "k", k);
  check_same_device(op, "q", q, "v", v);
  AttnArgs a;
  a.varlen = cu_q.has_value();
  LT_CHECK(op, cu_q.has_value() == cu_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  const int64_t dims = a.varlen ? 3 : 4;
  const char* layout = a.varlen ? "(total, heads, head_dim) with cu_seqlens" : "(batch, seqlen, heads, head_dim)";
  LT_CHECK(op, q.dim() == dims, "q must be ", layout, ", got shape ", q.sizes());
  LT_CHECK(op, k.dim() == dims, "k must be ", layout, ", got shape ", k.sizes());
  LT_CHECK(op, k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  LT_CHECK(op, q.size(-1) == k.size(-1), "q and k must have the same head_dim, got ", q.size(-1), " and ", k.size(-1));
  LT_CHECK(op, q.size(-1) >= 1, "head_dim must be >= 1, got ", q.size(-1));
  LT_CHECK(op, q.size(-2) >= 1 && k.size(-2) >= 1, "q and k need at least one head, got ", q.size(-2), " and ",
           k.size(-2));
  a.hq = static_cast<int32_t>(q.size(-2));
  a.hkv = static_cast<int32_t>(k.size(-2));
  LT_CHECK(op, a.hq % a.hkv == 0 || a.hkv % a.hq == 0, "the number of query heads (", a.hq,
           ") and of key/value heads (", a.hkv, ") must divide one another (MHA/GQA/MQA/SQA: H_q % H_kv == 0; ",
           "rSQA: H_kv % H_q == 0)");
  a.heads = std::max(a.hq, a.hkv);
  a.d = static_cast<int32_t>(q.size(-1));
  if (a.varlen) {
    LT_CHECK(op, !kpm.has_value(),
             "key_padding_mask cannot be combined with cu_seqlens (packed sequences have no padding)");
    a.total_q = q.size(0);
    a.total_k = k.size(0);
    a.cu_q = check_cu(op, "cu_seqlens_q", *cu_q, a.total_q, q);
    a.cu_k = check_cu(op, "cu_seqlens_k", *cu_k, a.total_k, q);
    LT_CHECK(op, a.cu_q.size() == a.cu_k.size(), "cu_seqlens_q and cu_seqlens_k must have the same length, got ",
             a.cu_q.size(), " and ", a.cu_k.size());
    a.batch = static_cast<int64_t>(a.cu_q.size()) - 1;
    for (int64_t b = 0; b < a.batch; ++b) {
      a.nq = std::max(a.nq, a.q_len(b));
      a.nk = std::max(a.nk, a.k_len(b));
    }
    LT_CHECK(op, max_q <= 0 || max_q >= a.nq, "max_seqlen_q=", max_q, " is shorter than the longest sequence (", a.nq,
             ")");
    LT_CHECK(op, max_k <= 0 || max_k >= a.nk, "max_seqlen_k=", max_k, " is shorter than the longest sequence (", a.nk,
             ")");
    a.cu_q_dev = cu_q->to(at::kLong).contiguous();
    a.cu_k_dev = cu_k->to(at::kLong).contiguous();
  } else {
    LT_CHECK(op, q.size(0) == k.size(0), "q and k must have the same batch size, got ", q.size(0), " and ", k.size(0));
    a.batch = q.size(0);
    a.nq = q.size(1);
    a.nk = k.size(1);
    a.total_q = a.batch * a.nq;
    a.total_k = a.batch * a.nk;
    if (kpm.has_value()) {
      check_same_device(op, "key_padding_mask", *kpm, "q", q);
      LT_CHECK(op, kpm->scalar_type() == at::kBool, "key_padding_mask must be bool (True = keep), got ",
               kpm->scalar_type());
      LT_CHECK(op, kpm->dim() == 2 && kpm->size(0) == a.batch && kpm->size(1) == a.nk,
               "key_padding_mask must have shape (batch, seqlen_k) = (", a.batch, ", ", a.nk, "), got ", kpm->sizes());
      a.kpm = kpm->to(at::kByte).contiguous();
    }
  }
  LT_CHECK(op, std::isfinite(scale) && scale != 0.0, "softmax_scale must be finite and non-zero, got ", scale);
  a.scale = scale;
  LT_CHECK(op, std::isfinite(softcap) && softcap >= 0.0, "softcap must be finite and >= 0 (0 = off), got ", softcap);
  a.softcap = softcap;
  MaskSpec& m = a.mask;
  m = mask;
  const int64_t total = m.total_heads > 0 ? m.total_heads : a.heads;
  LT_CHECK(op, m.head_offset + a.heads <= total, "mask: heads [head_offset, head_offset + heads) = [", m.head_offset,
           ", ", m.head_offset + a.heads, ") must lie within total_heads=", total);
  m.shift_from = static_cast<int32_t>(total / 2 - m.head_offset);
  if (m.mode == S2Mode::Roll) {
    for (int64_t b = 0; b < a.batch; ++b)
      LT_CHECK(op, a.q_len(b) == a.k_len(b), "s2_mode='longlora_roll' needs as many queries as keys per sequence, got ",
               a.q_len(b), " and ", a.k_len(b), " (sequence ", b, ")");
  }
  return a;
}

inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.dim() == 0 || t.stride(-1) == 1) ? t : t.contiguous();
}

inline at::Tensor empty_out(const AttnArgs& a, const at::Tensor& q) {
  if (a.varlen) return at::empty({a.total_q, a.heads, a.d}, q.options());
  return at::empty({a.batch, a.nq, a.heads, a.d}, q.options());
}
inline at::Tensor empty_lse(const AttnArgs& a, const at::Tensor& q) {
  const auto dt = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (a.varlen) return at::empty({a.heads, a.total_q}, q.options().dtype(dt));
  return at::empty({a.batch, a.heads, a.nq}, q.options().dtype(dt));
}

// grad_out like out; out and lse as returned by the forward.
inline void check_bwd_tensors(const char* op, const AttnArgs& a, const at::Tensor& q, const at::Tensor& grad_out,
                              const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> oshape =
      a.varlen ? std::vector<int64_t>{a.total_q, a.heads, a.d} : std::vector<int64_t>{a.batch, a.nq, a.heads, a.d};
  LT_CHECK(op, out.sizes() == at::IntArrayRef(oshape), "out must have shape ", at::IntArrayRef(oshape), ", got ",
           out.sizes());
  LT_CHECK(op, grad_out.sizes() == out.sizes(), "grad_out must have out's shape ", out.sizes(), ", got ",
           grad_out.sizes());
  LT_CHECK(op, grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
           "grad_out and out must have q's dtype ", q.scalar_type(), ", got ", grad_out.scalar_type(), " and ",
           out.scalar_type());
  const auto ldt = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> lshape =
      a.varlen ? std::vector<int64_t>{a.heads, a.total_q} : std::vector<int64_t>{a.batch, a.heads, a.nq};
  LT_CHECK(op, lse.sizes() == at::IntArrayRef(lshape) && lse.scalar_type() == ldt, "lse must be ", ldt, " with shape ",
           at::IntArrayRef(lshape), ", got ", lse.scalar_type(), " ", lse.sizes());
  check_same_device(op, "grad_out", grad_out, "q", q);
  check_same_device(op, "out", out, "q", q);
  check_same_device(op, "lse", lse, "q", q);
}

}  // namespace lt::attn
