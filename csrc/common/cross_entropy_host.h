// Host-side argument handling of the fused linear + cross-entropy ops, shared by every backend.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "common/checks.h"

namespace lt::cross_entropy {

struct CrossEntropyArgs {
  int64_t T = 0, d = 0, V = 0;
  bool has_bias = false;
  bool has_cw = false;  // class weights given
  double eps = 0, z_loss = 0, softcap = 0, filter = 0;
  int64_t ignore_index = -100;
};

// x (T, d), weight (V, d), bias (V,) or None, target (T,) int64 with values in [0, V) or ==
// ignore_index (checked with one device sync on CUDA, instead of a device-side assert).
inline CrossEntropyArgs check_args(const char* op, const at::Tensor& x, const at::Tensor& w,
                                   const std::optional<at::Tensor>& b, const at::Tensor& target, int64_t ignore_index,
                                   double eps, double z_loss, double softcap, bool allow_f64) {
  check_floating(op, "x", x, allow_f64);
  LT_CHECK(op, w.scalar_type() == x.scalar_type(), "weight must have x's dtype ", x.scalar_type(), ", got ",
           w.scalar_type());
  check_same_device(op, "x", x, "weight", w);
  check_same_device(op, "x", x, "target", target);
  LT_CHECK(op, x.dim() == 2, "x must be (tokens, hidden), got shape ", x.sizes());
  LT_CHECK(op, w.dim() == 2, "weight must be (vocab, hidden), got shape ", w.sizes());
  LT_CHECK(op, w.size(1) == x.size(1), "weight's hidden size (", w.size(1), ") must equal x's (", x.size(1), ")");
  LT_CHECK(op, w.size(0) >= 1, "weight must have at least one vocabulary row");
  LT_CHECK(op, target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == x.size(0),
           "target must be an int64 tensor of shape (tokens,) = (", x.size(0), ",), got ", target.scalar_type(), " ",
           target.sizes());
  CrossEntropyArgs a;
  a.T = x.size(0);
  a.d = x.size(1);
  a.V = w.size(0);
  if (b.has_value()) {
    LT_CHECK(op, b->scalar_type() == x.scalar_type(), "bias must have x's dtype ", x.scalar_type(), ", got ",
             b->scalar_type());
    check_same_device(op, "x", x, "bias", *b);
    LT_CHECK(op, b->dim() == 1 && b->size(0) == a.V, "bias must have shape (vocab,) = (", a.V, ",), got ", b->sizes());
    a.has_bias = true;
  }
  LT_CHECK(op, std::isfinite(eps) && eps >= 0 && eps <= 1, "label_smoothing must be in [0, 1], got ", eps);
  LT_CHECK(op, std::isfinite(z_loss) && z_loss >= 0, "z_loss must be >= 0, got ", z_loss);
  LT_CHECK(op, std::isfinite(softcap) && softcap >= 0, "softcap must be > 0 (or 0 / None for no capping), got ",
           softcap);
  a.eps = eps;
  a.z_loss = z_loss;
  a.softcap = softcap;
  a.ignore_index = ignore_index;
  if (a.T > 0) {
    const at::Tensor bad = (target != ignore_index) & ((target < 0) | (target >= a.V));
    if (bad.any().item<bool>()) {
      const int64_t i = bad.nonzero()[0][0].item<int64_t>();
      LT_CHECK(op, false, "target[", i, "] = ", target[i].item<int64_t>(), " is out of range for a vocabulary of ", a.V,
               " (and is not ignore_index = ", ignore_index, ")");
    }
  }
  return a;
}

inline void check_bwd(const char* op, const CrossEntropyArgs& a, const at::Tensor& x, const at::Tensor& grad,
                      const at::Tensor& lse, double filter) {
  const auto ldt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  LT_CHECK(op, grad.dim() == 1 && grad.size(0) == a.T && grad.scalar_type() == ldt, "grad_loss must be ", ldt,
           " of shape (", a.T, ",), got ", grad.scalar_type(), " ", grad.sizes());
  LT_CHECK(op, lse.dim() == 1 && lse.size(0) == a.T && lse.scalar_type() == ldt, "lse must be ", ldt, " of shape (",
           a.T, ",), got ", lse.scalar_type(), " ", lse.sizes());
  check_same_device(op, "x", x, "grad_loss", grad);
  check_same_device(op, "x", x, "lse", lse);
  LT_CHECK(op, std::isfinite(filter) && filter >= 0, "filter_eps must be >= 0, got ", filter);
}

inline void check_fwd_bwd(const char* op, const CrossEntropyArgs& a, const at::Tensor& x, const at::Tensor& grad_rows) {
  const auto ldt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  LT_CHECK(op, grad_rows.dim() == 1 && grad_rows.size(0) == a.T && grad_rows.scalar_type() == ldt, "grad_rows must be ",
           ldt, " of shape (", a.T, ",), got ", grad_rows.scalar_type(), " ", grad_rows.sizes());
  check_same_device(op, "x", x, "grad_rows", grad_rows);
}

// class_weight: (V,) floating, on x's device, one weight per vocabulary entry (F.cross_entropy's
// `weight`). Returns it contiguous in the compute dtype `ct` (float32, float64 for float64 input),
// or an undefined tensor without class weights; sets a.has_cw.
inline at::Tensor check_class_weight(const char* op, CrossEntropyArgs& a, const at::Tensor& x,
                                     const std::optional<at::Tensor>& cw, at::ScalarType ct) {
  if (!cw.has_value()) return at::Tensor();
  LT_CHECK(op, at::isFloatingType(cw->scalar_type()), "class_weight must be a floating tensor, got ",
           cw->scalar_type());
  check_same_device(op, "x", x, "class_weight", *cw);
  LT_CHECK(op, cw->dim() == 1 && cw->size(0) == a.V, "class_weight must have shape (vocab,) = (", a.V, ",), got ",
           cw->sizes());
  a.has_cw = true;
  return cw->to(ct).contiguous();
}

}  // namespace lt::cross_entropy
