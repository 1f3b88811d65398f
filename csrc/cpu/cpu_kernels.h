// CPU building blocks shared by the attention and the fused cross-entropy kernels: a row-major
// GEMM on the BLAS that libtorch carries, and vectorised softmax pieces (exp of non-positive
// arguments, row max, dot; AVX2 / AVX-512 paths chosen at run time). Internal linkage (anonymous
// namespace): every kernel file gets its own copy, no ODR ties between translation units.
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/multiversion.h"

// BLAS (Fortran interface) from the MKL / OpenBLAS that libtorch_cpu carries; weak, so a torch
// build without it falls back to the loops below instead of failing to load.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace lt::cpu {
namespace {

// Row-major C (M x N, ldc) = alpha * op(A) * op(B) + beta * C, op(X) = X or X^T (X row-major, ld).
template <class T>
void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb,
        T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
  const char fa = tb ? 'T' : 'N', fb = ta ? 'T' : 'N';
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_) {
      sgemm_(&fa, &fb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
      return;
    }
  } else {
    if (dgemm_) {
      dgemm_(&fa, &fb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
      return;
    }
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      T s = 0;
      for (int64_t p = 0; p < K; ++p)
        s += (ta ? A[p * lda + i] : A[i * lda + p]) * (tb ? B[j * ldb + p] : B[p * ldb + j]);
      C[i * ldc + j] = alpha * s + (beta == T(0) ? T(0) : beta * C[i * ldc + j]);
    }
}

// exp(x) for x <= 0 (softmax numerators), vectorisable: 2^n * p(r) with the degree-7 Taylor polynomial
// on |r| <= ln2/2 (truncation 5e-9, below fp32 rounding); x < -87 gives exactly 0 (also -inf = masked);
// NaN gives NaN.
LT_ALWAYS_INLINE float exp_neg(float x) {
  if (x != x) return x;
  const float xc = x < -87.f ? -87.f : x;
  const float n = __builtin_roundevenf(xc * 1.44269504088896341f);
  const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const float s = std::bit_cast<float>(int32_t(int32_t(n) + 127) << 23);
  return x < -87.f ? 0.f : p * s;
}
LT_ALWAYS_INLINE double exp_neg(double x) { return std::exp(x); }

#if defined(__x86_64__) && defined(__GNUC__)
#define LT_HAVE_AVX2_EXP 1
// 8 lanes of exp_neg (the same range reduction and polynomial) with AVX2 + FMA.
__attribute__((target("avx2,fma"))) inline __m256 exp_neg8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.f);
  const __m256 dead = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);  // also true for -inf; false for NaN
  const __m256 xc = _mm256_max_ps(lo, x);  // max_ps returns its second operand for NaN: NaN stays NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723212e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(dead, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
__attribute__((target("avx2,fma"))) float exp_row_avx2(float* __restrict s, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(s + c), mv));
    _mm256_storeu_ps(s + c, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, acc);
  float sum = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  for (; c < n; ++c) sum += (s[c] = exp_neg(s[c] - m));
  return sum;
}
const bool kHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif

// p[c] = exp(s[c] - m) for c < n; returns the sum.
float exp_row(float* __restrict s, int64_t n, float m) {
#ifdef LT_HAVE_AVX2_EXP
  if (kHasAvx2) return exp_row_avx2(s, n, m);
#endif
  float sum = 0.f;
  for (int64_t c = 0; c < n; ++c) sum += (s[c] = exp_neg(s[c] - m));
  return sum;
}
double exp_row(double* s, int64_t n, double m) {
  double sum = 0;
  for (int64_t c = 0; c < n; ++c) sum += (s[c] = std::exp(s[c] - m));
  return sum;
}

// Row maximum, NaN when the row holds a NaN (-inf for an empty row).
LT_MULTIVERSION float row_max(const float* __restrict s, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int64_t c = 0; c < n; ++c) {
    mx = s[c] > mx ? s[c] : mx;
    nan |= s[c] != s[c];
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : mx;
}
double row_max(const double* s, int64_t n) {
  double mx = -std::numeric_limits<double>::infinity();
  int nan = 0;
  for (int64_t c = 0; c < n; ++c) {
    mx = s[c] > mx ? s[c] : mx;
    nan |= s[c] != s[c];
  }
  return nan ? std::numeric_limits<double>::quiet_NaN() : mx;
}

// True when every element of the row is finite (a NaN or +-inf makes x * 0 NaN).
LT_MULTIVERSION bool row_finite(const float* __restrict s, int64_t n) {
  float z = 0.f;
#pragma omp simd reduction(+ : z)
  for (int64_t c = 0; c < n; ++c) z += s[c] * 0.f;
  return z == 0.f;
}
bool row_finite(const double* s, int64_t n) {
  double z = 0;
  for (int64_t c = 0; c < n; ++c) z += s[c] * 0.0;
  return z == 0.0;
}

LT_MULTIVERSION float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}
double dot(const double* a, const double* b, int64_t n) {
  double s = 0;
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

}  // namespace
}  // namespace lt::cpu
