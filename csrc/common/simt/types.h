// Storage types and bit-exact conversions shared by every backend of the intrinsics layer.
// f16 / bf16 are plain 16-bit storage structs (layout-compatible with at::Half / at::BFloat16,
// __half / __nv_bfloat16), so launchers can pass raw pointers without torch or cuda_fp16 types.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/macros.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace lt::simt {

struct Dim3 {
  uint32_t x = 1, y = 1, z = 1;
};

struct alignas(2) f16 {
  uint16_t bits;
};
struct alignas(2) bf16 {
  uint16_t bits;
};

LT_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
LT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// IEEE binary16, round to nearest even (the host path is bit-exact with __float2half_rn).
LT_HD uint16_t f32_to_f16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;                         // NaN (CUDA's canonical NaN)
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow / inf
  if (ax < 0x38800000u) {                                       // half subnormal or zero
    if (ax < 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t e = ax >> 23, mant = (ax & 0x7fffffu) | 0x800000u, shift = 126 - e;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (ax >> 13) - (112u << 10);
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
#endif
}

LT_HD float f16_bits_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = (uint32_t(h) & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e == 0x1f) return bits_float(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    if (m == 0) return bits_float(sign);
    return (sign ? -1.0f : 1.0f) * float(m) * (1.0f / 16777216.0f);  // m * 2^-24, exact
  }
  return bits_float(sign | ((e + 112) << 23) | (m << 13));
#endif
}

// bfloat16, round to nearest even (bit-exact with __float2bfloat16_rn).
LT_HD uint16_t f32_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
#endif
}
LT_HD float bf16_bits_to_f32(uint16_t h) { return bits_float(uint32_t(h) << 16); }

// Uniform load / store conversions used by kernels templated on the storage type.
LT_HD float to_float(float v) { return v; }
LT_HD float to_float(f16 v) { return f16_bits_to_f32(v.bits); }
LT_HD float to_float(bf16 v) { return bf16_bits_to_f32(v.bits); }
template <typename T>
LT_HD T from_float(float v);
template <>
LT_HD float from_float<float>(float v) {
  return v;
}
template <>
LT_HD f16 from_float<f16>(float v) {
  return f16{f32_to_f16_bits(v)};
}
template <>
LT_HD bf16 from_float<bf16>(float v) {
  return bf16{f32_to_bf16_bits(v)};
}

// Two 16-bit values packed into the 32-bit register layout mma/ldmatrix use (lo = first).
LT_HD uint32_t pack2(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

}  // namespace lt::simt
