// NaN-propagating building blocks shared by the CPU kernels, the CUDA kernels and the emulator.
// fmaxf / std::max / a `x > m ? x : m` running max all drop a NaN operand, so a max taken over a
// row that holds a NaN would come out finite and hide it; these keep it.
#pragma once
#include "common/macros.h"

namespace lt {

template <class T>
LT_HD bool is_nan(T x) { return x != x; }

// max(a, b), NaN if either is NaN.
template <class T>
LT_HD T nan_max(T a, T b) { return (a > b || a != a) ? a : b; }

// min(a, b), NaN if either is NaN.
template <class T>
LT_HD T nan_min(T a, T b) { return (a < b || a != a) ? a : b; }

}  // namespace lt
