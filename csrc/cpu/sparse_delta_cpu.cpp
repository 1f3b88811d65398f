// CPU kernel of the SpIEL gather-only delta gradient: one length-T dot product per index between
// a row of grad_out^T and a row of x^T (both transposed once so the dots are contiguous),
// accumulated over token tiles so the x^T tile stays in cache while all indices sweep over it.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/sparse_delta_host.h"

namespace lt::sparse_delta {
namespace {

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LT_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LT_MULTIVERSION
#endif

template <typename acc_t>
inline acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    s0 += a[t] * b[t];
    s1 += a[t + 1] * b[t + 1];
    s2 += a[t + 2] * b[t + 2];
    s3 += a[t + 3] * b[t + 3];
  }
  for (; t < n; ++t) s0 += a[t] * b[t];
  return (s0 + s1) + (s2 + s3);
}

LT_MULTIVERSION void dots_f32(const float* g, const float* x, const int64_t* idx, float* out, int64_t k0, int64_t k1,
                              int64_t in, int64_t T, int64_t t0, int64_t tn) {
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t r = idx[k] / in, c = idx[k] % in;
    out[k] += dot(g + r * T + t0, x + c * T + t0, tn);
  }
}
void dots(const float* g, const float* x, const int64_t* idx, float* out, int64_t k0, int64_t k1, int64_t in,
          int64_t T, int64_t t0, int64_t tn) {
  dots_f32(g, x, idx, out, k0, k1, in, T, t0, tn);
}
void dots(const double* g, const double* x, const int64_t* idx, double* out, int64_t k0, int64_t k1, int64_t in,
          int64_t T, int64_t t0, int64_t tn) {
  for (int64_t k = k0; k < k1; ++k) out[k] += dot(g + idx[k] / in * T + t0, x + idx[k] % in * T + t0, tn);
}

template <typename acc_t>
at::Tensor run(const GradArgs& a, at::ScalarType acc_type) {
  const at::Tensor g = a.gt.to(acc_type), x = a.xt.to(acc_type);
  at::Tensor out = at::zeros({a.K}, g.options());
  if (a.K == 0 || a.T == 0) return out;
  const acc_t* gp = g.data_ptr<acc_t>();
  const acc_t* xp = x.data_ptr<acc_t>();
  const int64_t* ip = a.idx.data_ptr<int64_t>();
  acc_t* op = out.data_ptr<acc_t>();
  // a token tile of x^T (in x tile floats) should stay in L2 while the indices sweep over it
  const int64_t tile = std::max<int64_t>(64, std::min<int64_t>(a.T, (int64_t(1) << 18) / std::max<int64_t>(a.in, 1)));
  for (int64_t t0 = 0; t0 < a.T; t0 += tile) {
    const int64_t tn = std::min(tile, a.T - t0);
    at::parallel_for(0, a.K, 256, [&](int64_t k0, int64_t k1) { dots(gp, xp, ip, op, k0, k1, a.in, a.T, t0, tn); });
  }
  return out;
}

at::Tensor sparse_delta_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& indices,
                                 int64_t in_features) {
  const GradArgs a = prepare_grad("sparse_delta_grad", grad_out, x, indices, in_features, /*allow_f64=*/true);
  const at::Tensor out = grad_out.scalar_type() == at::kDouble ? run<double>(a, at::kDouble) : run<float>(a, at::kFloat);
  return out.to(grad_out.scalar_type());
}

}  // namespace
}  // namespace lt::sparse_delta

TORCH_LIBRARY_IMPL(longtune, CPU, m) { m.impl("sparse_delta_grad", &lt::sparse_delta::sparse_delta_grad_cpu); }
