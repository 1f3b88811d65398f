// Quantizer arithmetic shared by the CPU kernel, the CUDA kernel and (by construction) the Python
// reference: the same IEEE float32 operations in the same order, so all three agree bit for bit
// on the same input values.
//
//   symmetric  (codes in [-2^(b-1), 2^(b-1)-1]):
//     scale = max(clip * max|x| / (2^(b-1) - 1), kScaleFloor),  q = clamp(rne(x / scale)), x^ = q * scale
//   asymmetric (codes in [0, 2^b - 1], the range always contains 0):
//     lo = clip * min(min x, 0), hi = clip * max(max x, 0)
//     scale = max((hi - lo) / (2^b - 1), kScaleFloor), zero = clamp(rne(-lo / scale), 0, 2^b - 1)
//     q = clamp(rne(x / scale) + zero),  x^ = (q - zero) * scale
// rne = round half to even (torch.round, rintf). kScaleFloor keeps constant and all-zero groups
// finite (a zero scale would divide 0 by 0). "In range" (for the clipping STE) means the
// unclamped code rne(x / scale) (+ zero) lies inside the code range.
// Non-finite groups behave as in the reference (torch.amax / maximum / clamp propagate NaN): a NaN
// in a group makes its statistics, scale, zero and every dequantized value NaN; an inf makes the
// scale inf and the dequantized values non-finite (0 * inf). max / min / clamp here are the
// NaN-propagating ones (fmaxf / fminf would drop the NaN and hide it behind kScaleFloor).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "common/nonfinite.h"

namespace lt::quant {

constexpr float kScaleFloor = 1e-8f;

struct QuantCfg {
  int32_t bits = 4;
  bool symmetric = true;
  float clip = 1.f;
};

struct GroupParams {
  float scale, zero;
};

LT_HD float rne(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);  // default rounding mode: to nearest, ties to even
#endif
}

LT_HD float qmin(const QuantCfg& c) { return c.symmetric ? -float(1 << (c.bits - 1)) : 0.f; }
LT_HD float qmax(const QuantCfg& c) { return c.symmetric ? float((1 << (c.bits - 1)) - 1) : float((1 << c.bits) - 1); }

// From the group's statistics: `amax` = max |x| (symmetric) or (`mn`, `mx`) = min / max (asymmetric).
LT_HD GroupParams group_params(const QuantCfg& c, float amax, float mn, float mx) {
  GroupParams g;
  if (c.symmetric) {
    g.scale = nan_max((c.clip * amax) / qmax(c), kScaleFloor);
    g.zero = 0.f;
  } else {
    const float lo = c.clip * nan_min(mn, 0.f), hi = c.clip * nan_max(mx, 0.f);
    g.scale = nan_max((hi - lo) / qmax(c), kScaleFloor);
    g.zero = nan_min(nan_max(rne(-lo / g.scale), 0.f), qmax(c));
  }
  return g;
}

LT_HD float unclamped_code(const QuantCfg& c, const GroupParams& g, float x) { return rne(x / g.scale) + g.zero; }

// The clamped code; NaN stays NaN (torch.clamp).
LT_HD float code(const QuantCfg& c, const GroupParams& g, float x) {
  return nan_min(nan_max(unclamped_code(c, g, x), qmin(c)), qmax(c));
}

// An integer code for storage: a NaN code (its group's scale is NaN / inf) is stored as 0.
LT_HD float storable_code(float q) { return q != q ? 0.f : q; }

LT_HD float dequant(const GroupParams& g, float q) { return (q - g.zero) * g.scale; }

LT_HD bool in_range(const QuantCfg& c, const GroupParams& g, float x) {
  const float u = unclamped_code(c, g, x);
  return u >= qmin(c) && u <= qmax(c);
}

}  // namespace lt::quant
