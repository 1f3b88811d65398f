// Device code of the SpIEL gather-only delta gradient (intrinsics layer: GPU and CPU emulator).
// One warp per index (grid-stride over indices): lanes stride over the T tokens of one row of
// grad_out^T and one row of x^T (coalesced, fp32 accumulation), then an xor-shuffle reduction.
#pragma once
#include <algorithm>

#include "common/simt/simt.h"
#include "common/sparse_adamw.h"
#include "cuda/common/dtype.h"
#include "cuda/common/launch.h"
#include "cuda/sparse_delta/sparse_delta_params.h"

namespace lt::sparse_delta {

constexpr int kGradThreads = 256;

template <class T>
struct GradKParams {
  simt::gptr<const T> grad_out_t, x_t;
  simt::gptr<const int64_t> idx;
  simt::gptr<float> out;
  int64_t tokens, in_features, K;
  int64_t grad_out_t_row_stride, x_t_row_stride;
};

template <class T>
LT_DEV void grad_body(const GradKParams<T>& p) {
  const uint32_t lane = simt::lane_id();
  const int64_t warps = int64_t(simt::grid_dim().x) * (simt::block_dim().x / 32);
  for (int64_t k = int64_t(simt::block_idx().x) * (simt::block_dim().x / 32) + simt::warp_id(); k < p.K; k += warps) {
    const int64_t flat = p.idx[k];
    const int64_t r = flat / p.in_features, c = flat % p.in_features;
    float acc = 0.f;
    for (int64_t t = lane; t < p.tokens; t += 32)
      acc += simt::to_float(p.grad_out_t[r * p.grad_out_t_row_stride + t]) *
             simt::to_float(p.x_t[c * p.x_t_row_stride + t]);
    for (int off = 16; off >= 1; off /= 2) acc += simt::shfl_xor(simt::kFullMask, acc, off);
    if (lane == 0) p.out[k] = acc;
  }
}

template <class T>
struct AdamWKParams {
  simt::gptr<T> values;
  simt::gptr<const T> grad;
  simt::gptr<float> m, v;
  simt::gptr<int32_t> age;
  int64_t n;
  AdamWCfg cfg;
};

template <class T>
LT_DEV void adamw_body(const AdamWKParams<T>& p) {
  const int64_t stride = int64_t(simt::grid_dim().x) * simt::block_dim().x;
  for (int64_t i = int64_t(simt::block_idx().x) * simt::block_dim().x + simt::thread_linear(); i < p.n; i += stride) {
    float m = p.m[i], v = p.v[i];
    int32_t age = p.age[i];
    const float nv = adamw_step(simt::to_float(p.values[i]), simt::to_float(p.grad[i]), m, v, age, p.cfg);
    p.values[i] = simt::from_float<T>(nv);
    p.m[i] = m;
    p.v[i] = v;
    p.age[i] = age;
  }
}

inline LaunchCfg adamw_launch_config(int64_t n, int64_t max_grid) {
  LaunchCfg c;
  c.block = {kGradThreads, 1, 1};
  c.grid = {grid_blocks(n, kGradThreads, max_grid), 1, 1};
  return c;
}

inline LaunchCfg grad_launch_config(const GradParams& gp, int64_t max_grid) {
  LaunchCfg c;
  c.block = {kGradThreads, 1, 1};
  c.grid = {grid_blocks(gp.K, kGradThreads / 32, max_grid), 1, 1};  // a warp per index
  return c;
}

template <class T>
GradKParams<T> make_grad_kparams(const GradParams& gp) {
  GradKParams<T> k;
  k.grad_out_t =
      simt::make_gptr(static_cast<const T*>(gp.grad_out_t), gp.out_features * gp.grad_out_t_row_stride, "grad_out");
  k.x_t = simt::make_gptr(static_cast<const T*>(gp.x_t), gp.in_features * gp.x_t_row_stride, "x");
  k.idx = simt::make_gptr(gp.idx, gp.K, "indices");
  k.out = simt::make_gptr(gp.out, gp.K, "out");
  k.tokens = gp.tokens;
  k.in_features = gp.in_features;
  k.K = gp.K;
  k.grad_out_t_row_stride = gp.grad_out_t_row_stride;
  k.x_t_row_stride = gp.x_t_row_stride;
  return k;
}

template <class T>
AdamWKParams<T> make_adamw_kparams(const AdamWParams& ap) {
  AdamWKParams<T> k;
  k.values = simt::make_gptr(static_cast<T*>(ap.values), ap.n, "values");
  k.grad = simt::make_gptr(static_cast<const T*>(ap.grad), ap.n, "grad");
  k.m = simt::make_gptr(ap.m, ap.n, "exp_avg");
  k.v = simt::make_gptr(ap.v, ap.n, "exp_avg_sq");
  k.age = simt::make_gptr(ap.age, ap.n, "age");
  k.n = ap.n;
  k.cfg = {ap.lr, ap.beta1, ap.beta2, ap.eps, ap.weight_decay};
  return k;
}

}  // namespace lt::sparse_delta
