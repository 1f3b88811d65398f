// The per-element AdamW update of sparse deltas, shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace lt::sparse_delta {

struct AdamWCfg {
  float lr, beta1, beta2, eps, weight_decay;
};

LT_HD float bias_correction(float beta, int32_t age) { return 1.f - powf(beta, static_cast<float>(age)); }

// Updates (m, v) in place from the gradient g, given the bias corrections of the element's new age;
// returns the new value.
LT_HD float adamw_update(float value, float g, float& m, float& v, float bc1, float bc2, const AdamWCfg& c) {
  m = c.beta1 * m + (1.f - c.beta1) * g;
  v = c.beta2 * v + (1.f - c.beta2) * g * g;
  const float update = (m / bc1) / (sqrtf(v / bc2) + c.eps);
  return value - c.lr * (update + c.weight_decay * value);
}

// Updates (value, m, v, age) in place from the gradient g; returns the new value.
LT_HD float adamw_step(float value, float g, float& m, float& v, int32_t& age, const AdamWCfg& c) {
  age += 1;
  return adamw_update(value, g, m, v, bias_correction(c.beta1, age), bias_correction(c.beta2, age), c);
}

}  // namespace lt::sparse_delta
