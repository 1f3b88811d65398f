// CPU kernel of the SpIEL gather-only delta gradient: out[k] = sum_t grad_out[t, r_k] x[t, c_k],
// K * T multiply-adds instead of the dense dW's out * in * T.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/sparse_adamw_host.h"
#include "common/sparse_delta_host.h"
#include "cpu/multiversion.h"

namespace lt::sparse_delta {
namespace {


// Token blocks of kTB tokens: the block's grad_out and x rows are transposed into feature-major
// tiles ([out][kTB] and [in][kTB], together (out + in) * kTB values, L2-resident), then every index
// reads two contiguous kTB-vectors and does kTB multiply-adds. No dense dW is ever formed.
constexpr int64_t kTB = 8;

template <typename acc_t>
inline void dots_block(const acc_t* __restrict gt, const acc_t* __restrict xt, const int32_t* __restrict rows,
                       const int32_t* __restrict cols, acc_t* __restrict acc, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) {
    const acc_t* a = gt + int64_t(rows[k]) * kTB;
    const acc_t* b = xt + int64_t(cols[k]) * kTB;
    acc_t s = 0;
    for (int64_t j = 0; j < kTB; ++j) s += a[j] * b[j];
    acc[k] += s;
  }
}

LT_MULTIVERSION void dots_f32(const float* gt, const float* xt, const int32_t* rows, const int32_t* cols, float* acc,
                              int64_t k0, int64_t k1) {
  dots_block(gt, xt, rows, cols, acc, k0, k1);
}
inline void dots(const float* gt, const float* xt, const int32_t* rows, const int32_t* cols, float* acc, int64_t k0,
                 int64_t k1) {
  dots_f32(gt, xt, rows, cols, acc, k0, k1);
}
inline void dots(const double* gt, const double* xt, const int32_t* rows, const int32_t* cols, double* acc, int64_t k0,
                 int64_t k1) {
  dots_block(gt, xt, rows, cols, acc, k0, k1);
}

// rows t0 .. t0+tb of src [T, f] -> dst [f][kTB] (zero-padded past tb)
template <typename acc_t>
void transpose_block(const acc_t* src, acc_t* dst, int64_t f, int64_t t0, int64_t tb) {
  for (int64_t j = 0; j < kTB; ++j) {
    const acc_t* s = src + (t0 + j) * f;
    if (j < tb)
      for (int64_t i = 0; i < f; ++i) dst[i * kTB + j] = s[i];
    else
      for (int64_t i = 0; i < f; ++i) dst[i * kTB + j] = acc_t(0);
  }
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
  // One parallel region: each thread owns a range of indices and transposes the token blocks for
  // itself (a few % of the work), so there is no barrier per token block (which would stall every
  // block on a busy machine).
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, a.K, std::max<int64_t>(1024, (a.K + nthreads - 1) / nthreads), [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> gt(a.out * kTB), xt(a.in * kTB);
    for (int64_t t0 = 0; t0 < a.T; t0 += kTB) {
      const int64_t tb = std::min(kTB, a.T - t0);
      transpose_block(g.data_ptr<acc_t>(), gt.data(), a.out, t0, tb);
      transpose_block(xx.data_ptr<acc_t>(), xt.data(), a.in, t0, tb);
      dots(gt.data(), xt.data(), rows.data(), cols.data(), op, k0, k1);
    }
  });
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
inline void adamw_run(scalar_t* __restrict val, const scalar_t* __restrict g, float* __restrict m,
                      float* __restrict v, int64_t n, float bc1, float bc2, const AdamWCfg& c) {
  for (int64_t i = 0; i < n; ++i)
    val[i] = static_cast<scalar_t>(adamw_update(static_cast<float>(val[i]), static_cast<float>(g[i]), m[i], v[i],
                                                bc1, bc2, c));
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
    case at::kFloat: adamw_rows(values.data_ptr<float>(), g.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(), age.data_ptr<int32_t>(), n, c); break;
    case at::kHalf: adamw_rows(values.data_ptr<at::Half>(), g.data_ptr<at::Half>(), m.data_ptr<float>(), v.data_ptr<float>(), age.data_ptr<int32_t>(), n, c); break;
    case at::kBFloat16: adamw_rows(values.data_ptr<at::BFloat16>(), g.data_ptr<at::BFloat16>(), m.data_ptr<float>(), v.data_ptr<float>(), age.data_ptr<int32_t>(), n, c); break;
    default: TORCH_INTERNAL_ASSERT(false);
  }
}

}  // namespace
}  // namespace lt::sparse_delta

TORCH_LIBRARY_IMPL(longtune, CPU, m) {
  m.impl("sparse_delta_grad", &lt::sparse_delta::sparse_delta_grad_cpu);
  m.impl("sparse_adamw_", &lt::sparse_delta::sparse_adamw_cpu);
}
