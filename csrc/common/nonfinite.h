// NaN-propagating building blocks shared by the CPU kernels, the CUDA kernels and the emulator.
// fmaxf / std::max / a `x > m ? x : m` running max all drop a NaN operand, so a max taken over a
// row that holds a NaN would come out finite and hide it; these keep it.
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace lt {

template <class T>
LT_HD bool is_nan(T x) {
  return x != x;
}

// max(a, b), NaN if either is NaN.
template <class T>
LT_HD T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// min(a, b), NaN if either is NaN.
template <class T>
LT_HD T nan_min(T a, T b) {
  return (a < b || a != a) ? a : b;
}

// Whether candidate (v, i) replaces the running argmax (cur, ci) in torch.argmax's order: a NaN is
// larger than everything, and equal values go to the lowest index (so a merge of partial argmaxes in
// any order gives torch.argmax's answer).
template <class T>
LT_HD bool argmax_better(T v, int64_t i, T cur, int64_t ci) {
  const bool vn = v != v, cn = cur != cur;
  if (vn || cn) return vn && (!cn || i < ci);
  return v > cur || (v == cur && i < ci);
}

}  // namespace lt
