// Device code of the fused rotate + fake-quantize kernels (intrinsics layer: runs on a GPU and on
// the CPU emulator). One block per row (grid-stride), one pass over global memory:
//   1. load chunks (128-bit when aligned), rotate: butterflies in registers and across lanes
//      (identical arithmetic to the Hadamard kernel), park fp32 values in shared memory;
//   2. the remaining butterfly levels in shared memory (radix 2..16 passes);
//   3. one warp per quantization group: max|v| or min/max by lane-strided reads + xor shuffles,
//      group scale / zero into shared memory (and to global for the codes output);
//   4. quantize-dequantize (or the STE mask of the gradient, or the integer codes) and store.
// For rotations with a factor m > 1 the factor mix of an element is computed where it is read
// (steps 3 and 4), with the Hadamard kernel's exact summation order.
#pragma once
#include "common/quant.h"
#include "cuda/hadamard/hadamard_kernel.cuh"
#include "cuda/quant/quant_params.h"

namespace lt::quant {

template <class T>
struct QKParams {
  simt::gptr<const T> x, grad;
  simt::gptr<T> y;
  simt::gptr<int8_t> codes_s;
  simt::gptr<uint8_t> codes_u;
  simt::gptr<float> scales, zeros;
  simt::gptr<const uint32_t> hbits;
  int64_t rows, n, x_row_stride, grad_row_stride, h, group, ngroups;
  int32_t m, log2p, hwords;
  bool rotate, vec_ok;
  float rscale;
  QuantCfg cfg;
  KMode mode;
};

template <class T>
LT_DEV float rotated_value(const QKParams<T>& p, simt::sptr<float> z, int64_t idx) {
  if (!p.rotate) return z[idx];
  if (p.m == 1) return z[idx] * p.rscale;
  const int64_t P = int64_t(1) << p.log2p;
  const int64_t b = idx / p.h, rem = idx % p.h;
  return hadamard::mix_one(z, p.hbits, p.m, p.hwords, P, b * p.h, rem / P, rem % P) * p.rscale;
}

template <class T, int E>
LT_DEV void quant_body(const QKParams<T>& p) {
  const int64_t n = p.n, chunks = n / E;
  const int64_t P = p.rotate ? (int64_t(1) << p.log2p) : E;
  const uint32_t tid = simt::thread_linear(), nthreads = simt::block_dim().x, lane = simt::lane_id();
  const uint32_t warp = simt::warp_id(), nwarps = nthreads / 32;
  const int64_t iters = (chunks + nthreads - 1) / nthreads;
  simt::sptr<float> z = simt::dynamic_smem<float>();
  simt::sptr<float> gscale = z + n, gzero = z + n + p.ngroups;
  for (int64_t row = simt::block_idx().x; row < p.rows; row += simt::grid_dim().x) {
    // 1
    for (int64_t it = 0; it < iters; ++it) {
      const int64_t j = it * nthreads + tid;
      const bool valid = j < chunks;
      float v[E];
      if (valid) hadamard::load_elems<E>(p.x, row * p.x_row_stride + j * E, p.vec_ok, v);
      else {
  LT_UNROLL for (int i = 0; i < E; ++i) v[i] = 0.f; }
      if (p.rotate) {
        hadamard::butterflies_in_registers<E>(v);
        hadamard::butterflies_across_lanes<E>(v, lane, P / E);
      }
      if (valid) { LT_UNROLL for (int i = 0; i < E; ++i) z[j * E + i] = v[i]; }
    }
    simt::sync_block();
    // 2
    if (p.rotate) {
      for (int64_t h = int64_t(32) * E; h < P;) {
        int r = 0;
        while (r < 4 && (h << (r + 1)) <= P) ++r;
        switch (r) {
          case 1: hadamard::smem_pass<1>(z, n, P, h); break;
          case 2: hadamard::smem_pass<2>(z, n, P, h); break;
          case 3: hadamard::smem_pass<3>(z, n, P, h); break;
          default: hadamard::smem_pass<4>(z, n, P, h); break;
        }
        h <<= r;
        simt::sync_block();
      }
    }
    // 3
    for (int64_t grp = warp; grp < p.ngroups; grp += nwarps) {
      float amax = 0.f, mn = 3.0e38f, mx = -3.0e38f;
      for (int64_t i = lane; i < p.group; i += 32) {
        const float v = rotated_value(p, z, grp * p.group + i);
        amax = nan_max(fabsf(v), amax);  // NaN-propagating: a NaN makes the group's scale NaN
        mn = nan_min(v, mn);
        mx = nan_max(v, mx);
      }
      for (int off = 16; off >= 1; off /= 2) {
        amax = nan_max(amax, simt::shfl_xor(simt::kFullMask, amax, off));
        mn = nan_min(mn, simt::shfl_xor(simt::kFullMask, mn, off));
        mx = nan_max(mx, simt::shfl_xor(simt::kFullMask, mx, off));
      }
      if (lane == 0) {
        const GroupParams gp = group_params(p.cfg, amax, mn, mx);
        gscale[grp] = gp.scale;
        gzero[grp] = gp.zero;
        if (p.mode == KMode::Codes) {
          p.scales[row * p.ngroups + grp] = gp.scale;
          p.zeros[row * p.ngroups + grp] = gp.zero;
        }
      }
    }
    simt::sync_block();
    // 4
    for (int64_t j = tid; j < chunks; j += nthreads) {
      float out[E];
      LT_UNROLL for (int i = 0; i < E; ++i) {
        const int64_t idx = j * E + i, grp = idx / p.group;
        const GroupParams gp{gscale[grp], gzero[grp]};
        const float v = rotated_value(p, z, idx);
        if (p.mode == KMode::Fake) {
          out[i] = dequant(gp, code(p.cfg, gp, v));
        } else if (p.mode == KMode::Mask) {
          out[i] = in_range(p.cfg, gp, v) ? simt::to_float(p.grad[row * p.grad_row_stride + idx]) : 0.f;
        } else {
          out[i] = code(p.cfg, gp, v);
        }
      }
      if (p.mode == KMode::Codes) {
        LT_UNROLL for (int i = 0; i < E; ++i) {
          if (p.cfg.symmetric) p.codes_s[row * n + j * E + i] = static_cast<int8_t>(storable_code(out[i]));
          else p.codes_u[row * n + j * E + i] = static_cast<uint8_t>(storable_code(out[i]));
        }
      } else {
        hadamard::store_elems<E>(p.y, row * n + j * E, p.vec_ok, out, 1.f);
      }
    }
    simt::sync_block();  // shared memory is reused by the next row
  }
}

// ---------------------------------------------------------------- host-side planning
inline LaunchCfg quant_launch_config(const QuantParams& qp, int64_t max_grid) {
  LaunchCfg c;
  const int64_t chunks = qp.n / qp.chunk;
  c.block = {static_cast<uint32_t>(std::min<int64_t>(hadamard::kBlockThreads, ((chunks + 31) / 32) * 32)), 1, 1};
  c.grid = {static_cast<uint32_t>(std::min<int64_t>(qp.rows, max_grid)), 1, 1};
  c.smem = static_cast<size_t>(qp.n + 2 * qp.ngroups) * sizeof(float);
  return c;
}

template <class T>
QKParams<T> make_qkparams(const QuantParams& qp) {
  QKParams<T> k;
  k.x = simt::make_gptr(static_cast<const T*>(qp.x), qp.x_span, "x");
  k.grad = simt::make_gptr(static_cast<const T*>(nullptr), 0, "grad");
  const int64_t out_n = qp.rows * qp.n;
  k.y = simt::make_gptr(static_cast<T*>(qp.y), qp.y ? out_n : 0, "y");
  k.codes_s = simt::make_gptr(static_cast<int8_t*>(qp.codes), qp.codes ? out_n : 0, "codes");
  k.codes_u = simt::make_gptr(static_cast<uint8_t*>(qp.codes), qp.codes ? out_n : 0, "codes");
  k.scales = simt::make_gptr(qp.scales, qp.scales ? qp.rows * qp.ngroups : 0, "scales");
  k.zeros = simt::make_gptr(qp.zeros, qp.zeros ? qp.rows * qp.ngroups : 0, "zeros");
  k.hbits = simt::make_gptr(qp.hbits, qp.hbits_span, "hbits");
  k.rows = qp.rows; k.n = qp.n; k.x_row_stride = qp.x_row_stride; k.grad_row_stride = 0;
  k.h = qp.h; k.group = qp.group; k.ngroups = qp.ngroups;
  k.m = qp.m; k.log2p = qp.log2p; k.hwords = qp.hwords;
  k.rotate = qp.rotate; k.vec_ok = qp.vec_ok; k.rscale = qp.rscale; k.cfg = qp.cfg; k.mode = qp.mode;
  return k;
}

template <class T>
QKParams<T> make_qkparams(const QuantBwdParams& bp) {
  QKParams<T> k = make_qkparams<T>(static_cast<const QuantParams&>(bp));
  k.grad = simt::make_gptr(static_cast<const T*>(bp.grad), bp.grad_span, "grad");
  k.grad_row_stride = bp.grad_row_stride;
  return k;
}

// Calls f.template operator()<T, E>() for the storage type and chunk width of qp.
template <class F>
void quant_dispatch(const QuantParams& qp, F&& f) {
  dispatch_dtype_chunk(qp.dtype, qp.chunk, f);
}

}  // namespace lt::quant
