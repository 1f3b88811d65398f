// Host-side glue shared by every backend of longtune::hadamard_transform{,_backward}:
// argument checks (one place, so the CPU, CUDA and emulator bindings cannot drift apart) and
// the [rows, n] view of the input.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "common/checks.h"
#include "common/hadamard_factors.h"

namespace lt::hadamard {

struct Call {
  at::Tensor rows;  // [R, n] view or copy of x with stride(1) == 1 (any row stride)
  at::Tensor out;   // x.sizes(), contiguous, x.dtype()
  Plan plan;
  bool empty = false;
};

inline Call prepare(const char* op, const at::Tensor& x, double scale, bool allow_f64) {
  LT_CHECK(op, x.dim() >= 1,
           "x must have at least 1 dimension (the transform runs over the "
           "last one), got a 0-dim tensor");
  check_floating(op, "x", x, allow_f64);
  LT_CHECK(op, std::isfinite(scale), "scale must be a finite number, got ", scale);
  const int64_t n = x.size(-1);
  auto plan = plan_for(n);
  LT_CHECK(op, plan.has_value(), unsupported_message(n));
  Call c;
  c.plan = *plan;
  c.out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) {
    c.empty = true;
    return c;
  }
  c.rows = x.reshape({-1, n});
  if (c.rows.stride(1) != 1) c.rows = c.rows.contiguous();
  return c;
}

}  // namespace lt::hadamard
