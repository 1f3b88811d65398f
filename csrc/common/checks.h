// Host-side argument checks for the op bindings (CPU, CUDA and emulator). Every message names the
// argument and what was expected, so a user sees e.g.
//   longtune.hadamard_transform: x must be float32, float16 or bfloat16, got Int
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#define LT_CHECK(op, cond, ...) TORCH_CHECK((cond), "longtune.", op, ": ", __VA_ARGS__)

namespace lt {

inline void check_floating(const char* op, const char* arg, const at::Tensor& t, bool allow_f64) {
  const auto dt = t.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || (allow_f64 && dt == at::kDouble);
  LT_CHECK(op, ok, arg, " must be ",
           allow_f64 ? "float32, float16, bfloat16 or float64" : "float32, float16 or bfloat16",
           (allow_f64 ? "" : " on this device (float64 is CPU-only)"), ", got ", dt);
}

inline void check_same_device(const char* op, const char* a, const at::Tensor& ta, const char* b,
                              const at::Tensor& tb) {
  LT_CHECK(op, ta.device() == tb.device(), a, " and ", b, " must be on the same device, got ", ta.device(), " and ",
           tb.device());
}

}  // namespace lt
