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
#include "cpu/fwht_cpu.h"

namespace lt::hadamard {
namespace {

using cpu::fwht_segments;

// Stage 1, rows in parallel: convert a row once into the accumulation type, run the 2^k-point
// transform on each of its m segments in place (the buffer stays in L1/L2), and either write the
// scaled result (m == 1) or park it in Z for stage 2.
// Stage 2 (m > 1): Y_r = (scale * H_m^T) Z_r for every row r (Z_r is the m x 2^k matrix of the
// row's segments), done for all rows at once as one [m, m] x [m, rows * 2^k] GEMM through ATen's BLAS - the dense m x m
// part, m <= 172, is what BLAS does best. It runs in float64 so that the m-term sums (up to 172 terms) add no rounding
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
