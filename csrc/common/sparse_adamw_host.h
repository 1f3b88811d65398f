// Argument checks of sparse_adamw_, shared by every backend.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "common/checks.h"
#include "common/sparse_adamw.h"

namespace lt::sparse_delta {

inline AdamWCfg check_adamw(const at::Tensor& values, const at::Tensor& grad, const at::Tensor& m, const at::Tensor& v,
                            const at::Tensor& age, double lr, double beta1, double beta2, double eps, double wd,
                            bool allow_f64) {
  const char* op = "sparse_adamw_";
  check_floating(op, "values", values, allow_f64);
  LT_CHECK(op, grad.scalar_type() == values.scalar_type(), "grad must have values' dtype ", values.scalar_type(),
           ", got ", grad.scalar_type());
  LT_CHECK(op, m.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
           "exp_avg and exp_avg_sq must be float32, got ", m.scalar_type(), " and ", v.scalar_type());
  LT_CHECK(op, age.scalar_type() == at::kInt, "age must be int32, got ", age.scalar_type());
  for (const auto* t : {&grad, &m, &v, &age}) {
    LT_CHECK(op, t->sizes() == values.sizes(), "grad, exp_avg, exp_avg_sq and age must have values' shape ",
             values.sizes(), ", got ", t->sizes());
    check_same_device(op, "values", values, "state", *t);
  }
  for (const auto* t : {&values, &m, &v, &age})
    LT_CHECK(op, t->is_contiguous(), "values and the optimizer state must be contiguous (updated in place)");
  LT_CHECK(op, std::isfinite(lr) && lr >= 0, "lr must be a finite number >= 0, got ", lr);
  LT_CHECK(op, beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "beta1 and beta2 must be in [0, 1), got ", beta1,
           " and ", beta2);
  LT_CHECK(op, eps > 0 && std::isfinite(eps), "eps must be a finite number > 0, got ", eps);
  LT_CHECK(op, std::isfinite(wd) && wd >= 0, "weight_decay must be a finite number >= 0, got ", wd);
  return {static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps),
          static_cast<float>(wd)};
}

}  // namespace lt::sparse_delta
