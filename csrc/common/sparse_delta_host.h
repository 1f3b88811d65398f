// Host-side argument handling of the sparse-delta ops, shared by every backend.
#pragma once
#include <ATen/ATen.h>

#include "common/checks.h"

namespace lt::sparse_delta {

struct GradArgs {
  at::Tensor idx; // [K] int64 contiguous
  int64_t T = 0, out = 0, in = 0, K = 0;
};

// Validates and lays out the operands: grad_out [..., out], x [..., in] with the same leading
// shape and dtype; indices strictly increasing in [0, out * in) (one device sync to check).
inline GradArgs prepare_grad(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& indices,
                             int64_t in_features, bool allow_f64) {
  check_floating(op, "grad_out", grad_out, allow_f64);
  LT_CHECK(op, x.scalar_type() == grad_out.scalar_type(), "x must have grad_out's dtype ", grad_out.scalar_type(),
           ", got ", x.scalar_type());
  check_same_device(op, "grad_out", grad_out, "x", x);
  check_same_device(op, "indices", indices, "x", x);
  LT_CHECK(op, indices.scalar_type() == at::kLong && indices.dim() == 1, "indices must be a 1-D int64 tensor, got ",
           indices.scalar_type(), " with shape ", indices.sizes());
  LT_CHECK(op, x.dim() >= 1 && grad_out.dim() == x.dim(), "grad_out and x must have the same number of dimensions (",
           "got ", grad_out.dim(), " and ", x.dim(), ")");
  LT_CHECK(op, in_features >= 1 && x.size(-1) == in_features, "x's last dimension must be in_features=", in_features,
           ", got ", x.size(-1));
  LT_CHECK(op, grad_out.sizes().slice(0, grad_out.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
           "grad_out and x must have the same leading shape, got ", grad_out.sizes(), " and ", x.sizes());
  GradArgs a;
  a.out = grad_out.size(-1);
  a.in = in_features;
  a.T = x.numel() / std::max<int64_t>(in_features, 1);
  a.K = indices.numel();
  a.idx = indices.contiguous();
  if (a.K > 0) {
    const int64_t lo = a.idx.min().item<int64_t>(), hi = a.idx.max().item<int64_t>();
    LT_CHECK(op, lo >= 0 && hi < a.out * a.in, "indices must lie in [0, out_features * in_features) = [0, ",
             a.out * a.in, "), got values in [", lo, ", ", hi, "]");
    if (a.K > 1)
      LT_CHECK(op, (a.idx.slice(0, 1) > a.idx.slice(0, 0, a.K - 1)).all().item<bool>(),
               "indices must be strictly increasing (sorted, no duplicates)");
  }
  return a;
}

}  // namespace lt::sparse_delta
