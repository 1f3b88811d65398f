// FWHT primitives of the CPU kernels (shared by the Hadamard and the rotated-quantization
// kernels): in-place 2^k-point transforms on a row buffer that stays in L1/L2. Internal linkage
// (static) so each including translation unit gets its own run-time-dispatched clones.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/multiversion.h"

namespace lt::cpu {

// Levels h = 1, 2, 4 of one 8-element group held in a vector register: each level is a lane
// permutation, an add, a subtract and a select (GCC/Clang vector extensions, so the code is
// portable and the compiler picks SSE / AVX2 / AVX-512 per clone).
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#if defined(__clang__)
#define LT_SHUFFLE8(v, a, b, c, d, e, f, g, h) __builtin_shufflevector(v, v, a, b, c, d, e, f, g, h)
#else
#define LT_SHUFFLE8(v, a, b, c, d, e, f, g, h) __builtin_shuffle(v, v8i{a, b, c, d, e, f, g, h})
#endif
LT_ALWAYS_INLINE v8f radix8(v8f v) {
  v8f t = LT_SHUFFLE8(v, 1, 0, 3, 2, 5, 4, 7, 6);
  v = (v8i{0, -1, 0, -1, 0, -1, 0, -1} != 0) ? t - v : v + t;
  t = LT_SHUFFLE8(v, 2, 3, 0, 1, 6, 7, 4, 5);
  v = (v8i{0, 0, -1, -1, 0, 0, -1, -1} != 0) ? t - v : v + t;
  t = LT_SHUFFLE8(v, 4, 5, 6, 7, 0, 1, 2, 3);
  return (v8i{0, 0, 0, 0, -1, -1, -1, -1} != 0) ? t - v : v + t;
}

template <typename acc_t>
LT_ALWAYS_INLINE void fwht_pow2(acc_t* __restrict v, int64_t P) {
  int64_t h = 1;
  if (P >= 8) {
    // levels h = 1, 2, 4 on 8-element groups in registers
    for (int64_t i = 0; i < P; i += 8) {
      if constexpr (std::is_same_v<acc_t, float>) {
        v8f r;
        std::memcpy(&r, v + i, sizeof r);
        r = radix8(r);
        std::memcpy(v + i, &r, sizeof r);
      } else {
        acc_t a[8];
        for (int j = 0; j < 8; ++j) a[j] = v[i + j];
        for (int s = 1; s < 8; s <<= 1)
          for (int j = 0; j < 8; ++j)
            if (!(j & s)) {
              const acc_t u = a[j], w = a[j + s];
              a[j] = u + w;
              a[j + s] = u - w;
            }
        for (int j = 0; j < 8; ++j) v[i + j] = a[j];
      }
    }
    h = 8;
  }
  // two levels per pass (radix 4): fewer sweeps over the row
  for (; 4 * h <= P; h *= 4)
    for (int64_t i = 0; i < P; i += 4 * h) {
      acc_t* __restrict p0 = v + i;
      acc_t* __restrict p1 = p0 + h;
      acc_t* __restrict p2 = p1 + h;
      acc_t* __restrict p3 = p2 + h;
      for (int64_t j = 0; j < h; ++j) {
        const acc_t a = p0[j], b = p1[j], c = p2[j], d = p3[j];
        const acc_t s0 = a + b, d0 = a - b, s1 = c + d, d1 = c - d;
        p0[j] = s0 + s1;
        p1[j] = d0 + d1;
        p2[j] = s0 - s1;
        p3[j] = d0 - d1;
      }
    }
  for (; h < P; h *= 2)
    for (int64_t i = 0; i < P; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const acc_t a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
}

static LT_MULTIVERSION void fwht_segments_f32(float* v, int64_t segs, int64_t P) {
  for (int64_t a = 0; a < segs; ++a) fwht_pow2(v + a * P, P);
}
static LT_MULTIVERSION void fwht_segments_f64(double* v, int64_t segs, int64_t P) {
  for (int64_t a = 0; a < segs; ++a) fwht_pow2(v + a * P, P);
}
static inline void fwht_segments(float* v, int64_t segs, int64_t P) { fwht_segments_f32(v, segs, P); }
static inline void fwht_segments(double* v, int64_t segs, int64_t P) { fwht_segments_f64(v, segs, P); }

}  // namespace lt::cpu
