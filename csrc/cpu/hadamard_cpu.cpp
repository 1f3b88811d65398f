// CPU kernel of the fast Walsh-Hadamard transform.
// Rows run in parallel (at::parallel_for). Each row is converted once into a per-thread fp32
// (fp64 for float64) buffer that stays in L1/L2, transformed in place with radix-8 + radix-4
// butterflies (inner loops auto-vectorised; AVX2/AVX-512 clones picked at run time), mixed by the
// m x m factor when n = m * 2^k, scaled and converted once on the way out.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
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

LT_MULTIVERSION void fwht_segments_f32(float* v, int64_t segs, int64_t P) {
  for (int64_t a = 0; a < segs; ++a) fwht_pow2(v + a * P, P);
}
LT_MULTIVERSION void fwht_segments_f64(double* v, int64_t segs, int64_t P) {
  for (int64_t a = 0; a < segs; ++a) fwht_pow2(v + a * P, P);
}
inline void fwht_segments(float* v, int64_t segs, int64_t P) { fwht_segments_f32(v, segs, P); }
inline void fwht_segments(double* v, int64_t segs, int64_t P) { fwht_segments_f64(v, segs, P); }

// Stage 1, rows in parallel: convert a row once into the accumulation type, run the 2^k-point
// transform on each of its m segments in place (the buffer stays in L1/L2), and either write the
// scaled result (m == 1) or park it in Z for stage 2.
// Stage 2 (m > 1): Y_r = (scale * H_m^T) Z_r for every row r (Z_r is the m x 2^k matrix of the
// row's segments), done for all rows at once as one [m, m] x [m, rows * 2^k] GEMM through ATen's BLAS - the dense m x m part, m <= 172, is what
// BLAS does best. It runs in float64 so that the m-term sums (up to 172 terms) add no rounding
// error of their own: the result is rounded once, whatever summation order the BLAS picks.
template <typename scalar_t, typename acc_t>
void run_rows(const Call& c, double scale, bool transpose) {
  const Plan p = c.plan;
  const int64_t n = p.n, R = c.rows.size(0), in_stride = c.rows.stride(0);
  const int64_t P = int64_t(1) << p.log2p;
  const scalar_t* in = c.rows.data_ptr<scalar_t>();
  // m > 1: stage-1 results go to Zt[a, r, :] (float64), so stage 2 is ONE large GEMM
  at::Tensor Zt;
  if (p.m > 1) Zt = at::empty({p.m, R, P}, c.rows.options().dtype(at::kDouble));
  double* zt = p.m > 1 ? Zt.data_ptr<double>() : nullptr;
  scalar_t* out = c.out.data_ptr<scalar_t>();
  const acc_t s = static_cast<acc_t>(scale);
  // ~64K elements of work per task keeps the scheduling overhead low for small n
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / n);
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> buf(n);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = in + r * in_stride;
      acc_t* b = buf.data();
      for (int64_t i = 0; i < n; ++i) b[i] = static_cast<acc_t>(xr[i]);
      fwht_segments(b, p.m, P);
      if (p.m == 1) {
        scalar_t* yr = out + r * n;
        for (int64_t i = 0; i < n; ++i) yr[i] = static_cast<scalar_t>(b[i] * s);
      } else {
        for (int64_t a = 0; a < p.m; ++a) {
          double* dst = zt + (a * R + r) * P;
          const acc_t* src = b + a * P;
          for (int64_t d = 0; d < P; ++d) dst[d] = static_cast<double>(src[d]);
        }
      }
    }
  });
  if (p.m > 1) {
    const auto& Hm = factor(p.m);
    at::Tensor H = at::empty({p.m, p.m}, at::dtype(at::kDouble));
    double* h = H.data_ptr<double>();
    for (int64_t c2 = 0; c2 < p.m; ++c2)  // row c of the left factor: H[:, c] (H[c, :] when transposed)
      for (int64_t a = 0; a < p.m; ++a) h[c2 * p.m + a] = scale * (transpose ? Hm[c2 * p.m + a] : Hm[a * p.m + c2]);
    const at::Tensor Y = at::mm(H, Zt.view({p.m, R * P}));  // [m, R*P]
    c.out.view({R, p.m, P}).copy_(Y.view({p.m, R, P}).permute({1, 0, 2}));
  }
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
