// CPU kernel of the SpIEL gather-only delta gradient: out[k] = sum_t grad_out[t, r_k] x[t, c_k],
// K * T multiply-adds instead of the dense dW's out * in * T.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/sparse_adamw_host.h"
#include "common/sparse_delta_host.h"
#include "cpu/multiversion.h"

namespace lt::sparse_delta {
namespace {

// Token blocks of kTB tokens: the block's x rows (all input features) and the grad_out columns of
// the thread's own output rows are transposed into feature-major tiles ([in][kTB], [rows][kTB]; at
// kTB = 32 and in = 4096 that is 512 KiB, L2-resident), then every index reads two contiguous
// kTB-vectors and does kTB multiply-adds. No dense dW is ever formed. (kTB = 8 made every index
// visit cost more in loop overhead than in arithmetic: 0.31 s at 4096^2, 4096 tokens, 1%.)
constexpr int64_t kTB = 16;

template <typename acc_t>
inline void dots_block(const acc_t* __restrict gt, const acc_t* __restrict xt, const int32_t* __restrict rows,
                       const int32_t* __restrict cols, acc_t* __restrict acc, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) {
    const acc_t* a = gt + int64_t(rows[k]) * kTB;
    const acc_t* b = xt + int64_t(cols[k]) * kTB;
    acc_t s[8] = {};
    for (int64_t j = 0; j < kTB; j += 8)
      for (int64_t l = 0; l < 8; ++l) s[l] += a[j + l] * b[j + l];
    acc[k] += ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// Four indices at a time, two accumulators each: eight independent FMA chains hide the latency.
__attribute__((target("avx2,fma"))) void dots_avx2(const float* __restrict gt, const float* __restrict xt,
                                                   const int32_t* __restrict rows, const int32_t* __restrict cols,
                                                   float* __restrict acc, int64_t k0, int64_t k1) {
  static_assert(kTB % 16 == 0);
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const float* a[4];
    const float* b[4];
    for (int i = 0; i < 4; ++i) {
      a[i] = gt + int64_t(rows[k + i]) * kTB;
      b[i] = xt + int64_t(cols[k + i]) * kTB;
    }
    __m256 s[4][2];
    for (int i = 0; i < 4; ++i) s[i][0] = s[i][1] = _mm256_setzero_ps();
    if (rows[k] == rows[k + 3]) {  // the usual case (indices sorted): one row's grad tile, loaded once
      for (int64_t j = 0; j < kTB; j += 16) {
        const __m256 a0 = _mm256_loadu_ps(a[0] + j), a1 = _mm256_loadu_ps(a[0] + j + 8);
        for (int i = 0; i < 4; ++i) {
          s[i][0] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b[i] + j), s[i][0]);
          s[i][1] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(b[i] + j + 8), s[i][1]);
        }
      }
    } else {
      for (int64_t j = 0; j < kTB; j += 16)
        for (int i = 0; i < 4; ++i) {
          s[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(a[i] + j), _mm256_loadu_ps(b[i] + j), s[i][0]);
          s[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(a[i] + j + 8), _mm256_loadu_ps(b[i] + j + 8), s[i][1]);
        }
    }
    // reduce the four 8-lane sums to one 4-lane vector (lane i = index k + i)
    const __m256 t0 = _mm256_hadd_ps(_mm256_add_ps(s[0][0], s[0][1]), _mm256_add_ps(s[1][0], s[1][1]));
    const __m256 t1 = _mm256_hadd_ps(_mm256_add_ps(s[2][0], s[2][1]), _mm256_add_ps(s[3][0], s[3][1]));
    const __m256 t = _mm256_hadd_ps(t0, t1);  // [0 1 2 3 | 0 1 2 3] halves
    const __m128 r = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    _mm_storeu_ps(acc + k, _mm_add_ps(_mm_loadu_ps(acc + k), r));
  }
  dots_block(gt, xt, rows, cols, acc, k, k1);
}
const bool kSdAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif

inline void dots(const float* gt, const float* xt, const int32_t* rows, const int32_t* cols, float* acc, int64_t k0,
                 int64_t k1) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kSdAvx2) return dots_avx2(gt, xt, rows, cols, acc, k0, k1);
#endif
  dots_block(gt, xt, rows, cols, acc, k0, k1);
}
inline void dots(const double* gt, const double* xt, const int32_t* rows, const int32_t* cols, double* acc, int64_t k0,
                 int64_t k1) {
  dots_block(gt, xt, rows, cols, acc, k0, k1);
}

// features f0 .. f1 of rows t0 .. t0+tb of src [T, f] -> dst [f1 - f0][kTB] (zero-padded past tb).
// 16 features at a time, so the 16 destination lines being filled stay in L1.
template <typename acc_t>
void transpose_block(const acc_t* src, acc_t* dst, int64_t f, int64_t f0, int64_t f1, int64_t t0, int64_t tb) {
  for (int64_t i0 = f0; i0 < f1; i0 += 16) {
    const int64_t i1 = std::min(f1, i0 + 16);
    for (int64_t j = 0; j < kTB; ++j) {
      acc_t* d = dst + (i0 - f0) * kTB + j;
      if (j < tb) {
        const acc_t* s = src + (t0 + j) * f;
        for (int64_t i = i0; i < i1; ++i, d += kTB) *d = s[i];
      } else {
        for (int64_t i = i0; i < i1; ++i, d += kTB) *d = acc_t(0);
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// Full float blocks (tb == kTB), features f0 .. f0 + 8n: 8 x 8 register transposes.
__attribute__((target("avx2,fma"))) void transpose_block_avx2(const float* src, float* dst, int64_t f, int64_t f0,
                                                              int64_t f1, int64_t t0) {
  for (int64_t j = 0; j < kTB; j += 8)
    for (int64_t i = f0; i < f1; i += 8) {
      __m256 r[8];
      for (int l = 0; l < 8; ++l) r[l] = _mm256_loadu_ps(src + (t0 + j + l) * f + i);
      const __m256 u0 = _mm256_unpacklo_ps(r[0], r[1]), u1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 u2 = _mm256_unpacklo_ps(r[2], r[3]), u3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 u4 = _mm256_unpacklo_ps(r[4], r[5]), u5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 u6 = _mm256_unpacklo_ps(r[6], r[7]), u7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 v0 = _mm256_shuffle_ps(u0, u2, 0x44), v1 = _mm256_shuffle_ps(u0, u2, 0xEE);
      const __m256 v2 = _mm256_shuffle_ps(u1, u3, 0x44), v3 = _mm256_shuffle_ps(u1, u3, 0xEE);
      const __m256 v4 = _mm256_shuffle_ps(u4, u6, 0x44), v5 = _mm256_shuffle_ps(u4, u6, 0xEE);
      const __m256 v6 = _mm256_shuffle_ps(u5, u7, 0x44), v7 = _mm256_shuffle_ps(u5, u7, 0xEE);
      float* d = dst + (i - f0) * kTB + j;
      _mm256_storeu_ps(d + 0 * kTB, _mm256_permute2f128_ps(v0, v4, 0x20));
      _mm256_storeu_ps(d + 1 * kTB, _mm256_permute2f128_ps(v1, v5, 0x20));
      _mm256_storeu_ps(d + 2 * kTB, _mm256_permute2f128_ps(v2, v6, 0x20));
      _mm256_storeu_ps(d + 3 * kTB, _mm256_permute2f128_ps(v3, v7, 0x20));
      _mm256_storeu_ps(d + 4 * kTB, _mm256_permute2f128_ps(v0, v4, 0x31));
      _mm256_storeu_ps(d + 5 * kTB, _mm256_permute2f128_ps(v1, v5, 0x31));
      _mm256_storeu_ps(d + 6 * kTB, _mm256_permute2f128_ps(v2, v6, 0x31));
      _mm256_storeu_ps(d + 7 * kTB, _mm256_permute2f128_ps(v3, v7, 0x31));
    }
}
#endif

template <typename acc_t>
void transpose(const acc_t* src, acc_t* dst, int64_t f, int64_t t0, int64_t tb) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (kSdAvx2 && tb == kTB) {
      const int64_t f8 = f / 8 * 8;
      transpose_block_avx2(src, dst, f, 0, f8, t0);
      if (f8 < f) transpose_block(src, dst + f8 * kTB, f, f8, f, t0, tb);
      return;
    }
  }
#endif
  transpose_block(src, dst, f, 0, f, t0, tb);
}

template <typename acc_t>
at::Tensor run(const at::Tensor& grad_out, const at::Tensor& x, const GradArgs& a, at::ScalarType acc_type) {
  at::Tensor out = at::zeros({a.K}, grad_out.options().dtype(acc_type));
  if (a.K == 0 || a.T == 0) return out;
  const at::Tensor g = grad_out.reshape({a.T, a.out}).to(acc_type).contiguous();
  const at::Tensor xx = x.reshape({a.T, a.in}).to(acc_type).contiguous();
  std::vector<int32_t> rows(a.K), cols(a.K);
  const int64_t* ip = a.idx.data_ptr<int64_t>();
  for (int64_t k = 0; k < a.K; ++k) {
    rows[k] = static_cast<int32_t>(ip[k] / a.in);
    cols[k] = static_cast<int32_t>(ip[k] % a.in);
  }
  acc_t* op = out.data_ptr<acc_t>();
  // Threads split the tokens (each transposes only its own token blocks, no work is duplicated) and
  // accumulate into their own length-K partial sums, added up at the end; one parallel region, no
  // barrier per token block.
  const int64_t nblocks = (a.T + kTB - 1) / kTB;
  const int64_t nparts = std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()), nblocks);
  std::vector<std::vector<acc_t>> partial(nparts - 1);
  at::parallel_for(0, nparts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> gt(a.out * kTB), xt(a.in * kTB);
    for (int64_t p = p0; p < p1; ++p) {
      acc_t* acc = op;
      if (p > 0) {
        partial[p - 1].assign(a.K, acc_t(0));
        acc = partial[p - 1].data();
      }
      for (int64_t blk = nblocks * p / nparts; blk < nblocks * (p + 1) / nparts; ++blk) {
        const int64_t t0 = blk * kTB, tb = std::min(kTB, a.T - t0);
        transpose(g.data_ptr<acc_t>(), gt.data(), a.out, t0, tb);
        transpose(xx.data_ptr<acc_t>(), xt.data(), a.in, t0, tb);
        dots(gt.data(), xt.data(), rows.data(), cols.data(), acc, 0, a.K);
      }
    }
  });
  for (const auto& part : partial) {
    const acc_t* src = part.data();
    at::parallel_for(0, a.K, 65536, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) op[k] += src[k];
    });
  }
  return out;
}

at::Tensor sparse_delta_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& indices,
                                 int64_t in_features) {
  const GradArgs a = prepare_grad("sparse_delta_grad", grad_out, x, indices, in_features, /*allow_f64=*/true);
  const at::Tensor out = grad_out.scalar_type() == at::kDouble ? run<double>(grad_out, x, a, at::kDouble)
                                                               : run<float>(grad_out, x, a, at::kFloat);
  return out.to(grad_out.scalar_type());
}

// A run of deltas with the same age: branch-free, so the compiler vectorises it (per ISA clone).
template <typename scalar_t>
inline void adamw_run(scalar_t* __restrict val, const scalar_t* __restrict g, float* __restrict m, float* __restrict v,
                      int64_t n, float bc1, float bc2, const AdamWCfg& c) {
  for (int64_t i = 0; i < n; ++i)
    val[i] = static_cast<scalar_t>(
        adamw_update(static_cast<float>(val[i]), static_cast<float>(g[i]), m[i], v[i], bc1, bc2, c));
}
LT_MULTIVERSION void adamw_run_f32(float* val, const float* g, float* m, float* v, int64_t n, float bc1, float bc2,
                                   const AdamWCfg& c) {
  adamw_run(val, g, m, v, n, bc1, bc2, c);
}
inline void adamw_run_any(float* val, const float* g, float* m, float* v, int64_t n, float bc1, float bc2,
                          const AdamWCfg& c) {
  adamw_run_f32(val, g, m, v, n, bc1, bc2, c);
}
template <typename scalar_t>
inline void adamw_run_any(scalar_t* val, const scalar_t* g, float* m, float* v, int64_t n, float bc1, float bc2,
                          const AdamWCfg& c) {
  adamw_run(val, g, m, v, n, bc1, bc2, c);
}

template <typename scalar_t>
void adamw_rows(scalar_t* val, const scalar_t* g, float* m, float* v, int32_t* age, int64_t n, const AdamWCfg& c) {
  at::parallel_for(0, n, 65536, [&](int64_t i0, int64_t i1) {
    // neighbouring deltas almost always share their age (all but the freshly regrown ones): process
    // runs of equal age with the two bias corrections computed once per run
    for (int64_t i = i0; i < i1;) {
      const int32_t a = age[i];
      int64_t j = i + 1;
      while (j < i1 && age[j] == a) ++j;
      adamw_run_any(val + i, g + i, m + i, v + i, j - i, bias_correction(c.beta1, a + 1),
                    bias_correction(c.beta2, a + 1), c);
      for (int64_t t = i; t < j; ++t) age[t] = a + 1;
      i = j;
    }
  });
}

void sparse_adamw_cpu(const at::Tensor& values, const at::Tensor& grad, const at::Tensor& m, const at::Tensor& v,
                      const at::Tensor& age, double lr, double b1, double b2, double eps, double wd) {
  const AdamWCfg c = check_adamw(values, grad, m, v, age, lr, b1, b2, eps, wd, /*allow_f64=*/false);
  const at::Tensor g = grad.contiguous();
  const int64_t n = values.numel();
  switch (values.scalar_type()) {
    case at::kFloat:
      adamw_rows(values.data_ptr<float>(), g.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(),
                 age.data_ptr<int32_t>(), n, c);
      break;
    case at::kHalf:
      adamw_rows(values.data_ptr<at::Half>(), g.data_ptr<at::Half>(), m.data_ptr<float>(), v.data_ptr<float>(),
                 age.data_ptr<int32_t>(), n, c);
      break;
    case at::kBFloat16:
      adamw_rows(values.data_ptr<at::BFloat16>(), g.data_ptr<at::BFloat16>(), m.data_ptr<float>(), v.data_ptr<float>(),
                 age.data_ptr<int32_t>(), n, c);
      break;
    default: TORCH_INTERNAL_ASSERT(false);
  }
}

}  // namespace
}  // namespace lt::sparse_delta

TORCH_LIBRARY_IMPL(longtune, CPU, m) {
  m.impl("sparse_delta_grad", &lt::sparse_delta::sparse_delta_grad_cpu);
  m.impl("sparse_adamw_", &lt::sparse_delta::sparse_adamw_cpu);
}
