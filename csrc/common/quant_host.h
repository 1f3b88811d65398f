// Host-side argument handling of the rotated-quantization ops, shared by every backend.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <string>

#include "common/checks.h"
#include "common/hadamard_factors.h"
#include "common/quant.h"

namespace lt::quant {

enum class Ste : int32_t { Identity = 0, Clip = 1 };

struct Args {
  QuantCfg cfg;
  int64_t n = 0, group = 0, ngroups = 1;
  bool rotate = false;
  int64_t h = 0;                 // rotation block size (h == n: the whole row)
  hadamard::Plan hplan;          // h = m * 2^log2p
  double rscale = 1.0;           // 1 / sqrt(h), passed to the Hadamard ops as is (like Python does)
  Ste ste = Ste::Identity;
};

inline Args check_args(const char* op, const at::Tensor& x, int64_t bits, const std::string& granularity,
                       int64_t group_size, bool symmetric, double clip_ratio, bool rotate, int64_t hadamard_size,
                       const std::string& ste_mode, bool allow_f64) {
  LT_CHECK(op, x.dim() >= 1, "x must have at least 1 dimension, got a 0-dim tensor");
  check_floating(op, "x", x, allow_f64);
  LT_CHECK(op, bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8, got ", bits);
  LT_CHECK(op, std::isfinite(clip_ratio) && clip_ratio > 0 && clip_ratio <= 1, "clip_ratio must be in (0, 1], got ",
           clip_ratio);
  LT_CHECK(op, ste_mode == "identity" || ste_mode == "clip", "ste must be 'identity' or 'clip', got '", ste_mode, "'");
  Args a;
  a.cfg = {static_cast<int32_t>(bits), symmetric, static_cast<float>(clip_ratio)};
  a.n = x.size(-1);
  LT_CHECK(op, a.n >= 1, "the last dimension of x must not be empty");
  if (granularity == "per_token") {
    a.group = a.n;
  } else if (granularity == "per_group") {
    LT_CHECK(op, group_size >= 1 && a.n % group_size == 0,
             "group_size must be a positive divisor of the last "
             "dimension (",
             a.n, ") for granularity='per_group', got ", group_size);
    a.group = group_size;
  } else {
    LT_CHECK(op, false, "granularity must be 'per_token' or 'per_group', got '", granularity, "'");
  }
  a.ngroups = a.n / a.group;
  a.rotate = rotate;
  a.ste = ste_mode == "clip" ? Ste::Clip : Ste::Identity;
  if (rotate) {
    a.h = hadamard_size <= 0 ? a.n : hadamard_size;
    LT_CHECK(op, a.n % a.h == 0, "hadamard_size must divide the last dimension (", a.n, "), got ", a.h);
    auto plan = hadamard::plan_for(a.h);
    LT_CHECK(op, plan.has_value(), "cannot rotate: ", hadamard::unsupported_message(a.h));
    a.hplan = *plan;
    a.rscale = 1.0 / std::sqrt(static_cast<double>(a.h));
  }
  return a;
}

// The transposed (block) rotation of a gradient through a registered Hadamard op
// ("longtune::hadamard_transform_backward" or the emulator's twin).
inline at::Tensor rotate_back(const at::Tensor& g, const Args& a, const char* hadamard_bwd_op) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow(hadamard_bwd_op, "")
                .typed<at::Tensor(const at::Tensor&, double)>();
  auto sizes = g.sizes().vec();
  sizes.back() = a.n / a.h;
  sizes.push_back(a.h);
  return op.call(g.reshape(sizes), a.rscale).reshape(g.sizes());
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& x) {
  LT_CHECK(op, grad.sizes() == x.sizes(), "grad must have x's shape ", x.sizes(), ", got ", grad.sizes());
  LT_CHECK(op, grad.scalar_type() == x.scalar_type(), "grad must have x's dtype ", x.scalar_type(), ", got ",
           grad.scalar_type());
  check_same_device(op, "grad", grad, "x", x);
}

// grad_x = R^T (mask * grad). `masked()` returns mask * grad; it is called for ste 'clip' only.
template <class Masked>
at::Tensor ste_backward(const Args& a, const at::Tensor& grad, const at::Tensor& x, Masked&& masked,
                        const char* hadamard_bwd_op) {
  if (x.numel() == 0) return at::empty_like(grad);
  const at::Tensor gm = a.ste == Ste::Clip ? masked() : grad.contiguous();
  return a.rotate ? rotate_back(gm, a, hadamard_bwd_op) : gm.clone();
}

inline at::Tensor group_shape_empty(const at::Tensor& x, const Args& a) {
  auto sizes = x.sizes().vec();
  sizes.back() = a.ngroups;
  return at::empty(sizes, x.options().dtype(at::kFloat));
}

}  // namespace lt::quant
