// CPU kernel of the fast Walsh-Hadamard transform.
// Rows run in parallel (at::parallel_for). Each row is converted once into a per-thread fp32
// (fp64 for float64) buffer that stays in L1/L2, transformed in place with radix-8 + radix-4
// butterflies (inner loops auto-vectorised; AVX2/AVX-512 clones picked at run time), mixed by the
// m x m factor when n = m * 2^k, scaled and converted once on the way out.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/hadamard_host.h"

namespace lt::hadamard {
namespace {

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LT_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LT_MULTIVERSION
#endif
#define LT_ALWAYS_INLINE inline __attribute__((always_inline))

template <typename acc_t>
LT_ALWAYS_INLINE void fwht_pow2(acc_t* __restrict v, int64_t P) {
  int64_t h = 1;
  if (P >= 8) {
    // levels h = 1, 2, 4 on 8-element chunks in registers
    for (int64_t i = 0; i < P; i += 8) {
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

// out[c*P + d] = sum_a H[a, c] * z[a*P + d]   (H^T when transpose)
// The m-term sums use kParts interleaved partial sums combined pairwise: a sequential sum's
// rounding error grows with m (172 terms), the partial sums cut it about 4x.
constexpr int64_t kParts = 8;
template <typename acc_t>
LT_ALWAYS_INLINE void mix_factor(const acc_t* __restrict z, acc_t* __restrict out, acc_t* __restrict part,
                                 const int8_t* H, int64_t m, int64_t P, bool transpose) {
  for (int64_t c = 0; c < m; ++c) {
    for (int64_t d = 0; d < kParts * P; ++d) part[d] = 0;
    for (int64_t a = 0; a < m; ++a) {
      const int8_t s = transpose ? H[c * m + a] : H[a * m + c];
      const acc_t* __restrict zr = z + a * P;
      acc_t* __restrict o = part + (a % kParts) * P;
      if (s > 0)
        for (int64_t d = 0; d < P; ++d) o[d] += zr[d];
      else
        for (int64_t d = 0; d < P; ++d) o[d] -= zr[d];
    }
    for (int64_t w = kParts / 2; w >= 1; w /= 2)
      for (int64_t k = 0; k < w; ++k) {
        acc_t* __restrict lo = part + k * P;
        const acc_t* __restrict hi = part + (k + w) * P;
        for (int64_t d = 0; d < P; ++d) lo[d] += hi[d];
      }
    acc_t* __restrict o = out + c * P;
    for (int64_t d = 0; d < P; ++d) o[d] = part[d];
  }
}

// One row, buffers already filled: returns the pointer holding the result.
template <typename acc_t>
LT_ALWAYS_INLINE acc_t* transform_row(acc_t* buf, acc_t* tmp, const int8_t* H, const Plan& p,
                                      bool transpose) {
  const int64_t P = int64_t(1) << p.log2p;
  for (int64_t a = 0; a < p.m; ++a) fwht_pow2(buf + a * P, P);
  if (p.m == 1) return buf;
  mix_factor(buf, tmp, tmp + p.n, H, p.m, P, transpose);
  return tmp;
}

LT_MULTIVERSION float* transform_row_f32(float* buf, float* tmp, const int8_t* H, const Plan& p,
                                         bool transpose) {
  return transform_row(buf, tmp, H, p, transpose);
}
LT_MULTIVERSION double* transform_row_f64(double* buf, double* tmp, const int8_t* H,
                                          const Plan& p, bool transpose) {
  return transform_row(buf, tmp, H, p, transpose);
}
inline float* transform_row_any(float* b, float* t, const int8_t* H, const Plan& p, bool tr) {
  return transform_row_f32(b, t, H, p, tr);
}
inline double* transform_row_any(double* b, double* t, const int8_t* H, const Plan& p, bool tr) {
  return transform_row_f64(b, t, H, p, tr);
}

template <typename scalar_t, typename acc_t>
void run_rows(const Call& c, double scale, bool transpose) {
  const Plan p = c.plan;
  const int64_t n = p.n, R = c.rows.size(0), in_stride = c.rows.stride(0);
  const scalar_t* in = c.rows.data_ptr<scalar_t>();
  scalar_t* out = c.out.data_ptr<scalar_t>();
  const int8_t* H = factor(p.m).data();
  const acc_t s = static_cast<acc_t>(scale);
  // ~64K elements of work per task keeps the scheduling overhead low for small n
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / n);
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> buf(n), tmp(p.m > 1 ? n + kParts * (n / p.m) : 0);  // out + partial sums
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = in + r * in_stride;
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(xr[i]);
      const acc_t* y = transform_row_any(buf.data(), tmp.data(), H, p, transpose);
      scalar_t* yr = out + r * n;
      for (int64_t i = 0; i < n; ++i) yr[i] = static_cast<scalar_t>(y[i] * s);
    }
  });
}

at::Tensor hadamard_cpu(const char* op, const at::Tensor& x, double scale, bool transpose) {
  Call c = prepare(op, x, scale, /*allow_f64=*/true);
  if (c.empty) return c.out;
  switch (x.scalar_type()) {
    case at::kFloat: run_rows<float, float>(c, scale, transpose); break;
    case at::kDouble: run_rows<double, double>(c, scale, transpose); break;
    case at::kHalf: run_rows<at::Half, float>(c, scale, transpose); break;
    case at::kBFloat16: run_rows<at::BFloat16, float>(c, scale, transpose); break;
    default: TORCH_INTERNAL_ASSERT(false);
  }
  return c.out;
}

at::Tensor hadamard_transform_cpu(const at::Tensor& x, double scale) {
  return hadamard_cpu("hadamard_transform", x, scale, false);
}
at::Tensor hadamard_transform_backward_cpu(const at::Tensor& g, double scale) {
  return hadamard_cpu("hadamard_transform_backward", g, scale, true);
}

}  // namespace
}  // namespace lt::hadamard

TORCH_LIBRARY_IMPL(longtune, CPU, m) {
  m.impl("hadamard_transform", &lt::hadamard::hadamard_transform_cpu);
  m.impl("hadamard_transform_backward", &lt::hadamard::hadamard_transform_backward_cpu);
}
