// Host glue shared by the CUDA and the emulator bindings of the fused linear + cross-entropy:
// argument checks (common/cross_entropy_host.h), contiguous inputs, outputs / fp32 scratch, params.
// lse is computed for every row, ignored ones included (their loss and gradients are 0).
// Without bias, dbias is an empty tensor (shape (0,), x's dtype and device).
#pragma once
#include <ATen/ATen.h>

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "common/cross_entropy_host.h"
#include "cuda/common/torch_glue.h"
#include "cuda/cross_entropy/cross_entropy_params.h"

namespace lt::cross_entropy {

// Class weights as fp32 and their sum as a device scalar (no host sync); undefined without.
inline std::pair<at::Tensor, at::Tensor> class_weight_f32(const char* op, CrossEntropyArgs& a, const at::Tensor& x,
                                                          const std::optional<at::Tensor>& cw) {
  const at::Tensor c = check_class_weight(op, a, x, cw, at::kFloat);
  if (!c.defined()) return {};
  return {c, c.sum().reshape({1})};
}

template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_device(const at::Tensor& x, const at::Tensor& w,
                                                                        const std::optional<at::Tensor>& b,
                                                                        const at::Tensor& target, int64_t ignore_index,
                                                                        double eps, double z_loss, double softcap,
                                                                        const std::optional<at::Tensor>& class_weight,
                                                                        Launch&& launch) {
  const char* op = "linear_cross_entropy_fwd";
  CrossEntropyArgs a = check_args(op, x, w, b, target, ignore_index, eps, z_loss, softcap, /*allow_f64=*/false);
  const auto [cw, wsum] = class_weight_f32(op, a, x, class_weight);
  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor loss = at::zeros({a.T}, fopt), lse = at::zeros({a.T}, fopt);
  at::Tensor amax = at::zeros({a.T}, target.options());
  if (a.T == 0) return {loss, lse, amax};
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), tc = target.contiguous();
  const at::Tensor bc = a.has_bias ? b->contiguous() : at::Tensor();
  FwdParams fp;
  fp.x = xc.data_ptr();
  fp.w = wc.data_ptr();
  fp.b = a.has_bias ? bc.data_ptr() : nullptr;
  fp.target = tc.data_ptr<int64_t>();
  fp.loss = loss.data_ptr<float>();
  fp.lse = lse.data_ptr<float>();
  fp.argmax = amax.data_ptr<int64_t>();
  fp.cw = a.has_cw ? cw.data_ptr<float>() : nullptr;
  fp.wsum = a.has_cw ? wsum.data_ptr<float>() : nullptr;
  fp.T = a.T;
  fp.d = a.d;
  fp.V = a.V;
  fp.ignore_index = a.ignore_index;
  fp.x_row_stride = a.d;
  fp.w_row_stride = a.d;  // xc, wc are contiguous
  fp.eps = static_cast<float>(a.eps);
  fp.z_loss = static_cast<float>(a.z_loss);
  fp.softcap = static_cast<float>(a.softcap);
  fp.dtype = to_dtype(x);
  plan_fwd(fp);
  const at::Tensor part = at::empty({fp.nsplit, a.T, kStatW}, fopt);
  fp.part = part.data_ptr<float>();
  const at::Tensor part_idx = at::empty({fp.nsplit, a.T}, target.options());
  fp.part_idx = part_idx.data_ptr<int64_t>();
  launch(fp);
  return {loss, lse, amax};
}

template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_bwd_device(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
    const at::Tensor& target, const at::Tensor& lse, int64_t ignore_index, double eps, double z_loss, double softcap,
    double filter, const std::optional<at::Tensor>& class_weight, Launch&& launch) {
  const char* op = "linear_cross_entropy_bwd";
  CrossEntropyArgs a = check_args(op, x, w, b, target, ignore_index, eps, z_loss, softcap, /*allow_f64=*/false);
  check_bwd(op, a, x, grad, lse, filter);
  const auto [cw, wsum] = class_weight_f32(op, a, x, class_weight);
  const bool f32 = x.scalar_type() == at::kFloat;
  const auto fopt = x.options().dtype(at::kFloat);
  // fp32 inputs accumulate straight into the (zeroed) outputs
  at::Tensor dx = f32 ? at::zeros({a.T, a.d}, x.options()) : at::empty({a.T, a.d}, x.options());
  at::Tensor dw = f32 ? at::zeros({a.V, a.d}, w.options()) : at::empty({a.V, a.d}, w.options());
  at::Tensor db = a.has_bias ? (f32 ? at::zeros({a.V}, b->options()) : at::empty({a.V}, b->options()))
                             : at::empty({0}, x.options());
  if (a.T == 0) {
    dx.zero_();
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  const at::Tensor dx32 = f32 ? dx : at::zeros({a.T, a.d}, fopt);
  const at::Tensor dw32 = f32 ? dw : at::zeros({a.V, a.d}, fopt);
  const at::Tensor db32 = !a.has_bias ? at::Tensor() : f32 ? db : at::zeros({a.V}, fopt);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), tc = target.contiguous();
  const at::Tensor bc = a.has_bias ? b->contiguous() : at::Tensor();
  const at::Tensor gc = grad.contiguous(), lc = lse.contiguous();
  BwdParams bp;
  bp.grad = gc.data_ptr<float>();
  bp.x = xc.data_ptr();
  bp.w = wc.data_ptr();
  bp.b = a.has_bias ? bc.data_ptr() : nullptr;
  bp.target = tc.data_ptr<int64_t>();
  bp.lse = lc.data_ptr<float>();
  bp.cw = a.has_cw ? cw.data_ptr<float>() : nullptr;
  bp.wsum = a.has_cw ? wsum.data_ptr<float>() : nullptr;
  bp.dx32 = dx32.data_ptr<float>();
  bp.dw32 = dw32.data_ptr<float>();
  bp.db32 = a.has_bias ? db32.data_ptr<float>() : nullptr;
  bp.dx = dx.data_ptr();
  bp.dw = dw.data_ptr();
  bp.db = a.has_bias ? db.data_ptr() : nullptr;
  bp.T = a.T;
  bp.d = a.d;
  bp.V = a.V;
  bp.ignore_index = a.ignore_index;
  bp.x_row_stride = a.d;
  bp.w_row_stride = a.d;  // xc, wc, dx32, dw32 are contiguous
  bp.dx_row_stride = a.d;
  bp.dw_row_stride = a.d;
  bp.eps = static_cast<float>(a.eps);
  bp.z_loss = static_cast<float>(a.z_loss);
  bp.softcap = static_cast<float>(a.softcap);
  bp.filter = static_cast<float>(filter);
  bp.dtype = to_dtype(x);
  launch(bp);
  return {dx, dw, db};
}

// LT_LCE_DEVICE_ROWS=n: rows per chunk of the device one-pass op (docs/tuning.md), read at every
// call; 0 (unset) = automatic. A value that is not an integer in [1, 2^31) is reported on stderr
// (once) and the automatic choice is kept.
inline int64_t onepass_rows_env() {
  const char* e = std::getenv("LT_LCE_DEVICE_ROWS");
  if (!e) return 0;
  char* end = nullptr;
  const long long n = std::strtoll(e, &end, 10);
  while (end && *end == ' ') ++end;
  if (end != e && end && *end == '\0' && n >= 1 && n < (1LL << 31)) return n;
  static bool warned = false;
  if (!warned) {
    warned = true;
    std::fprintf(stderr,
                 "longtune: ignoring LT_LCE_DEVICE_ROWS=\"%s\": expected an integer number of rows >= 1 "
                 "(docs/tuning.md); using the automatic chunk\n",
                 e);
  }
  return 0;
}

// linear_cross_entropy_fwd_bwd on the device, in one pass (OnePassParams): per chunk of rows the
// logits are formed once, kept as fp32 in a [rows, V] scratch and turned into d logits by the
// backward kernel. fp32_grads: dx / dweight / dbias are the fp32 accumulators themselves (not
// rounded to the inputs' dtype). weight_grad=False: no dW / dbias product; both come back empty.
template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_bwd_device(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, const at::Tensor& target,
    const at::Tensor& grad_rows, int64_t ignore_index, double eps, double z_loss, double softcap, bool weight_grad,
    const std::optional<at::Tensor>& class_weight, bool fp32_grads, Launch&& launch) {
  const char* op = "linear_cross_entropy_fwd_bwd";
  CrossEntropyArgs a = check_args(op, x, w, b, target, ignore_index, eps, z_loss, softcap, /*allow_f64=*/false);
  check_fwd_bwd(op, a, x, grad_rows);
  const auto [cw, wsum] = class_weight_f32(op, a, x, class_weight);
  const bool f32 = x.scalar_type() == at::kFloat;
  const bool keep32 = f32 || fp32_grads;  // the results are the fp32 accumulators
  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor loss = at::zeros({a.T}, fopt), lse = at::zeros({a.T}, fopt);
  at::Tensor amax = at::zeros({a.T}, target.options());
  const at::Tensor dx32 = at::zeros({a.T, a.d}, fopt);
  const at::Tensor dw32 = weight_grad ? at::zeros({a.V, a.d}, fopt) : at::Tensor();
  const at::Tensor db32 = weight_grad && a.has_bias ? at::zeros({a.V}, fopt) : at::Tensor();
  at::Tensor dx = keep32 ? dx32 : at::empty({a.T, a.d}, x.options());
  at::Tensor dw = !weight_grad ? x.new_empty({0}) : keep32 ? dw32 : at::empty({a.V, a.d}, w.options());
  at::Tensor db = !(weight_grad && a.has_bias) ? x.new_empty({0}) : keep32 ? db32 : at::empty({a.V}, b->options());
  if (a.T == 0) {
    if (!keep32) {
      dx.zero_();
      dw.zero_();
      db.zero_();
    }
    return {loss, lse, dx, dw, db, amax};
  }
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), tc = target.contiguous();
  const at::Tensor bc = a.has_bias ? b->contiguous() : at::Tensor();
  const at::Tensor gc = grad_rows.contiguous();
  OnePassParams p;
  p.rows = onepass_rows(a.T, a.V, onepass_rows_env());
  FwdParams& fp = p.fwd;
  fp.x = xc.data_ptr();
  fp.w = wc.data_ptr();
  fp.b = a.has_bias ? bc.data_ptr() : nullptr;
  fp.target = tc.data_ptr<int64_t>();
  fp.loss = loss.data_ptr<float>();
  fp.lse = lse.data_ptr<float>();
  fp.argmax = amax.data_ptr<int64_t>();
  fp.cw = a.has_cw ? cw.data_ptr<float>() : nullptr;
  fp.wsum = a.has_cw ? wsum.data_ptr<float>() : nullptr;
  fp.T = a.T;
  fp.d = a.d;
  fp.V = a.V;
  fp.ignore_index = a.ignore_index;
  fp.x_row_stride = a.d;
  fp.w_row_stride = a.d;  // xc, wc, dx32, dw32 are contiguous
  fp.eps = static_cast<float>(a.eps);
  fp.z_loss = static_cast<float>(a.z_loss);
  fp.softcap = static_cast<float>(a.softcap);
  fp.dtype = to_dtype(x);
  const int64_t entries = onepass_part_entries(a.T, a.V, p.rows);
  const at::Tensor part = at::empty({entries, kStatW}, fopt);
  const at::Tensor part_idx = at::empty({entries}, target.options());
  fp.part = part.data_ptr<float>();
  fp.part_idx = part_idx.data_ptr<int64_t>();
  // a tensor (not a raw allocation): the op's largest scratch, visible to memory trackers
  const at::Tensor logits = at::empty({std::min(p.rows, a.T), a.V}, fopt);
  p.logits = logits.data_ptr<float>();
  BwdParams& bp = p.bwd;
  bp.grad = gc.data_ptr<float>();
  bp.x = fp.x;
  bp.w = fp.w;
  bp.b = fp.b;
  bp.target = fp.target;
  bp.lse = fp.lse;
  bp.cw = fp.cw;
  bp.wsum = fp.wsum;
  bp.dx32 = dx32.data_ptr<float>();
  bp.dw32 = weight_grad ? dw32.data_ptr<float>() : nullptr;
  bp.db32 = db32.defined() ? db32.data_ptr<float>() : nullptr;
  bp.dx = keep32 ? nullptr : dx.data_ptr();
  bp.dw = keep32 || !weight_grad ? nullptr : dw.data_ptr();
  bp.db = keep32 || !db32.defined() ? nullptr : db.data_ptr();
  bp.T = a.T;
  bp.d = a.d;
  bp.V = a.V;
  bp.ignore_index = a.ignore_index;
  bp.x_row_stride = a.d;
  bp.w_row_stride = a.d;
  bp.dx_row_stride = a.d;
  bp.dw_row_stride = a.d;
  bp.eps = fp.eps;
  bp.z_loss = fp.z_loss;
  bp.softcap = fp.softcap;
  bp.filter = 0.f;  // only tiles whose d logits are all exactly 0 are skipped
  bp.wgrad = weight_grad;
  bp.dtype = fp.dtype;
  launch(p);
  return {loss, lse, dx, dw, db, amax};
}

}  // namespace lt::cross_entropy
