// The per-element AdamW update of sparse deltas, shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace lt::sparse_delta {

struct AdamWCfg {
  float lr, beta1, beta2, eps, weight_decay;
};

// Updates (value, m, v, age) in place from the gradient g; returns the new value.
LT_HD float adamw_step(float value, float g, float& m, float& v, int32_t& age, const AdamWCfg& c) {
  age += 1;
  m = c.beta1 * m + (1.f - c.beta1) * g;
  v = c.beta2 * v + (1.f - c.beta2) * g * g;
  const float bc1 = 1.f - powf(c.beta1, static_cast<float>(age));
  const float bc2 = 1.f - powf(c.beta2, static_cast<float>(age));
  const float update = (m / bc1) / (sqrtf(v / bc2) + c.eps);
  return value - c.lr * (update + c.weight_decay * value);
}

}  // namespace lt::sparse_delta
