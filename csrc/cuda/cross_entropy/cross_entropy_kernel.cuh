// Device code of the fused linear + cross-entropy (intrinsics layer: GPU and CPU emulator).
//
// Logits are never materialised: a block takes kBM rows of x and kBN-column vocabulary tiles of W,
// staging kBK-wide chunks of both in shared memory (fp32, transposed, padded so that the reads
// of the inner products are conflict-free) and accumulating the kBM x kBN tile in registers with
// fp32 FMAs (a thread owns kTM rows x kTN columns). The tile then goes through shared memory:
//  - forward: warp w owns rows kRW w .. kRW w + kRW - 1 and keeps their online state (max, its first
//    column, sum exp(z - max), z[target], sum (w_c) z) in registers over the tiles of its vocabulary
//    split; the states are written per (split, row) to an fp32 scratch (the argmax to an int64 one)
//    and a merge kernel (one thread per row) forms lse, loss and argmax.
//  - class weights w (optional): loss_t = (1 - eps) w_t (lse - z_t) + eps / V sum_c w_c (lse - z_c)
//    + z_loss lse^2, d loss / dz_c = p_c ((1 - eps) w_t + eps sum(w) / V + 2 z_loss lse)
//    - eps w_c / V - (1 - eps) w_t [c == t]; without them every w is 1 (the same arithmetic).
//  - backward: one block per (row block, vocabulary tile) recomputes the tile, forms d logits
//    (skipping the tile when every |d logit| is 0 or below filter_eps), and accumulates
//    dx += G W_tile and dW_tile += G^T x chunk by chunk of the hidden dimension with fp32 atomics
//    (dx and dW both: no block owns a whole row of either without holding d floats per row), and
//    dbias with one atomic per column; atomics adding an exact 0 are skipped. fp16/bf16 results go
//    through fp32 accumulators and a convert kernel.
// All index math is 64-bit; rows / columns / hidden indices past the ends load as 0 and are masked.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/nonfinite.h"
#include "common/simt/simt.h"
#include "cuda/common/launch.h"
#include "cuda/cross_entropy/cross_entropy_params.h"

namespace lt::cross_entropy {

constexpr int kXS = kBM + 1;  // shared x chunk: [kBK][kXS] (x transposed)
constexpr int kWS = kBN + 1;  // shared W chunk: [kBK][kWS] (W transposed)
constexpr int kSS = kBN + 1;  // shared logits / d logits tile: [kBM][kSS]
constexpr int kTM = kBM / 16, kTN = kBN / 16;  // a thread's micro-tile: rows ty + .., columns tx + 16 j
constexpr int kWarps = kThreads / 32;
constexpr int kRW = kBM / kWarps;  // rows per warp in the forward's softmax pass
constexpr int kCL = kBN / 32;      // columns per lane in the forward's softmax pass
static_assert(kThreads == 256 && kBM % 16 == 0 && kBN % 32 == 0 && kRW <= 32, "tile shape");
static_assert((kBM * kBK) % kThreads == 0 && (kBN * kBK) % kThreads == 0, "chunk loads");
constexpr int kSmemFloats = kBK * kXS + kBK * kWS + kBM * kSS + kWarps;
constexpr size_t kSmemBytes = sizeof(float) * kSmemFloats;
constexpr int kMergeThreads = 256;
constexpr int kConvThreads = 256;

template <class T>
struct FwdK {
  simt::gptr<const T> x, w, b;
  simt::gptr<const int64_t> target;
  simt::gptr<float> part, loss, lse;
  simt::gptr<int64_t> part_idx, argmax;
  simt::gptr<const float> cw, wsum;
  int64_t tokens, d, V, ignore_index, nsplit, tiles_per_split;
  int64_t x_row_stride, w_row_stride;
  float eps, z_loss, softcap;
  bool has_bias, has_cw;
};

template <class T>
struct BwdK {
  simt::gptr<const float> grad, lse;
  simt::gptr<const T> x, w, b;
  simt::gptr<const int64_t> target;
  simt::gptr<float> dx, dw, db;
  simt::gptr<const float> cw, wsum;
  int64_t tokens, d, V, ignore_index;
  int64_t x_row_stride, w_row_stride, dx_row_stride, dw_row_stride;
  float eps, z_loss, softcap, filter;
  bool has_bias, has_cw;
};

// Rows whose target is ignore_index, for the backward: they read nothing, so their x rows are staged
// as zeros (a NaN there must not reach dW through their zero d logits).
struct Skip {
  simt::gptr<const int64_t> target;
  int64_t ignore_index;
  bool on;
};

// Stages x[row0 : row0+kBM, k0 : k0+kBK] and W[col0 : col0+kBN, k0 : k0+kBK] (fp32, transposed).
template <class T>
LT_DEV void load_chunks(simt::gptr<const T> x, simt::gptr<const T> w, int64_t tokens, int64_t V, int64_t d,
                        int64_t x_row_stride, int64_t w_row_stride, int64_t row0, int64_t col0, int64_t k0,
                        simt::sptr<float> xs, simt::sptr<float> ws, const Skip& skip) {
  const int tid = static_cast<int>(simt::thread_linear());
  LT_UNROLL for (int q = 0; q < kBM * kBK / kThreads; ++q) {
    const int e = tid + q * kThreads, r = e / kBK, k = e % kBK;
    const int64_t gr = row0 + r, gk = k0 + k;
    const bool read = gr < tokens && gk < d && !(skip.on && skip.target[gr] == skip.ignore_index);
    xs[k * kXS + r] = read ? simt::to_float(x[gr * x_row_stride + gk]) : 0.f;
  }
  LT_UNROLL for (int q = 0; q < kBN * kBK / kThreads; ++q) {
    const int e = tid + q * kThreads, n = e / kBK, k = e % kBK;
    const int64_t gn = col0 + n, gk = k0 + k;
    ws[k * kWS + n] = (gn < V && gk < d) ? simt::to_float(w[gn * w_row_stride + gk]) : 0.f;
  }
}

// acc[i][j] = sum_k x[row0 + kTM ty + i, k] W[col0 + tx + 16 j, k] (ty = tid / 16, tx = tid % 16).
template <class T>
LT_DEV void logits_tile(simt::gptr<const T> x, simt::gptr<const T> w, int64_t tokens, int64_t V, int64_t d,
                        int64_t x_row_stride, int64_t w_row_stride, int64_t row0, int64_t col0, simt::sptr<float> xs,
                        simt::sptr<float> ws, float (&acc)[kTM][kTN], const Skip& skip) {
  const int tid = static_cast<int>(simt::thread_linear()), ty = tid / 16, tx = tid % 16;
  LT_UNROLL for (int i = 0; i < kTM; ++i) LT_UNROLL for (int j = 0; j < kTN; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < d; k0 += kBK) {
    load_chunks<T>(x, w, tokens, V, d, x_row_stride, w_row_stride, row0, col0, k0, xs, ws, skip);
    simt::sync_block();
    const int kn = d - k0 < kBK ? static_cast<int>(d - k0) : kBK;
    for (int k = 0; k < kn; ++k) {
      float a[kTM], bv[kTN];
      LT_UNROLL for (int i = 0; i < kTM; ++i) a[i] = xs[k * kXS + kTM * ty + i];
      LT_UNROLL for (int j = 0; j < kTN; ++j) bv[j] = ws[k * kWS + tx + 16 * j];
      LT_UNROLL for (int i = 0; i < kTM; ++i) LT_UNROLL for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
    }
    simt::sync_block();
  }
}

// The capped logit z from the raw product (bias added in fp32).
LT_DEV float cap_logit(float l, float softcap) { return softcap > 0.f ? softcap * tanhf(l / softcap) : l; }

template <class T>
LT_DEV void fwd_body(const FwdK<T>& p) {
  const simt::sptr<float> xs = simt::dynamic_smem<float>();
  const simt::sptr<float> ws = xs + kBK * kXS;
  const simt::sptr<float> ss = ws + kBK * kWS;
  const int tid = static_cast<int>(simt::thread_linear()), ty = tid / 16, tx = tid % 16;
  const int warp = static_cast<int>(simt::warp_id()), lane = static_cast<int>(simt::lane_id());
  const int64_t nrb = (p.tokens + kBM - 1) / kBM, nvt = (p.V + kBN - 1) / kBN;
  const int64_t split = simt::block_idx().y;
  const int64_t vt0 = split * p.tiles_per_split, vt1 = vt0 + p.tiles_per_split < nvt ? vt0 + p.tiles_per_split : nvt;
  for (int64_t rb = simt::block_idx().x; rb < nrb; rb += simt::grid_dim().x) {
    const int64_t row0 = rb * kBM;
    float m[kRW], s[kRW], zt[kRW], sz[kRW];
    int64_t tg[kRW], ai[kRW];
    LT_UNROLL for (int i = 0; i < kRW; ++i) {
      m[i] = -INFINITY; s[i] = 0.f; zt[i] = 0.f; sz[i] = 0.f;
      ai[i] = p.V;  // no column seen yet
      const int64_t gr = row0 + kRW * warp + i;
      const int64_t t = gr < p.tokens ? p.target[gr] : p.ignore_index;
      tg[i] = t == p.ignore_index ? -1 : t;
    }
    for (int64_t vt = vt0; vt < vt1; ++vt) {
      const int64_t col0 = vt * kBN;
      float acc[kTM][kTN];
      logits_tile<T>(p.x, p.w, p.tokens, p.V, p.d, p.x_row_stride, p.w_row_stride, row0, col0, xs, ws, acc,
                     Skip{p.target, p.ignore_index, false});
      LT_UNROLL for (int j = 0; j < kTN; ++j) {
        const int64_t gc = col0 + tx + 16 * j;
        const float bias = (p.has_bias && gc < p.V) ? simt::to_float(p.b[gc]) : 0.f;
        LT_UNROLL for (int i = 0; i < kTM; ++i)
          ss[(kTM * ty + i) * kSS + tx + 16 * j] = cap_logit(acc[i][j] + bias, p.softcap);
      }
      simt::sync_block();
      float cwv[kCL];  // this lane's columns' class weights (1 without)
      LT_UNROLL for (int c = 0; c < kCL; ++c) {
        const int64_t gc = col0 + lane + 32 * c;
        cwv[c] = p.has_cw && gc < p.V ? static_cast<float>(p.cw[gc]) : 1.f;
      }
      LT_UNROLL for (int i = 0; i < kRW; ++i) {
        const int r = kRW * warp + i;
        float z[kCL];
        float tm = -INFINITY;
        LT_UNROLL for (int c = 0; c < kCL; ++c) {
          z[c] = col0 + lane + 32 * c < p.V ? static_cast<float>(ss[r * kSS + lane + 32 * c]) : -INFINITY;
          tm = nan_max(z[c], tm);
        }
        // NaN-propagating max: a NaN logit (x row or W row) makes the row's lse and loss NaN
        for (int off = 16; off >= 1; off /= 2) tm = nan_max(tm, simt::shfl_xor(simt::kFullMask, tm, off));
        // the tile's first column holding tm (a NaN when tm is NaN): lane minimum, then warp minimum
        int li = kBN;
        LT_UNROLL for (int c = 0; c < kCL; ++c) {
          const int lc = lane + 32 * c;
          const bool hit = tm != tm ? z[c] != z[c] : z[c] == tm;
          if (hit && lc < li && col0 + lc < p.V) li = lc;
        }
        for (int off = 16; off >= 1; off /= 2) {
          const int o = simt::shfl_xor(simt::kFullMask, li, off);
          li = o < li ? o : li;
        }
        if (li < kBN && argmax_better(tm, col0 + li, m[i], ai[i])) ai[i] = col0 + li;
        const float nm = nan_max(m[i], tm);
        float e = 0.f, zs = 0.f, zt_ = 0.f;
        LT_UNROLL for (int c = 0; c < kCL; ++c) {
          const int64_t gc = col0 + lane + 32 * c;
          if (gc < p.V) {
            e += expf(z[c] - nm);
            zs += cwv[c] * z[c];
            if (gc == tg[i]) zt_ += z[c];
          }
        }
        for (int off = 16; off >= 1; off /= 2) {
          e += simt::shfl_xor(simt::kFullMask, e, off);
          zs += simt::shfl_xor(simt::kFullMask, zs, off);
          zt_ += simt::shfl_xor(simt::kFullMask, zt_, off);
        }
        s[i] = s[i] * expf(m[i] - nm) + e;
        m[i] = nm;
        sz[i] += zs;
        zt[i] += zt_;
      }
      simt::sync_block();
    }
    // lane i writes row i's state (the values are identical in every lane after the reductions)
    LT_UNROLL for (int i = 0; i < kRW; ++i) {
      const int64_t gr = row0 + kRW * warp + i;
      if (i == lane && gr < p.tokens) {
        const int64_t o = (split * p.tokens + gr) * kStatW;
        p.part[o + 0] = m[i];
        p.part[o + 1] = s[i];
        p.part[o + 2] = zt[i];
        p.part[o + 3] = sz[i];
        p.part_idx[split * p.tokens + gr] = ai[i];
      }
    }
  }
}

// One thread per row: merges the splits' states into lse and loss.
template <class T>
LT_DEV void merge_body(const FwdK<T>& p) {
  const int64_t stride = int64_t(simt::grid_dim().x) * simt::block_dim().x;
  for (int64_t t = int64_t(simt::block_idx().x) * simt::block_dim().x + simt::thread_linear(); t < p.tokens;
       t += stride) {
    float M = -INFINITY;
    int64_t bi = p.V;
    for (int64_t sp = 0; sp < p.nsplit; ++sp) {
      const float v = p.part[(sp * p.tokens + t) * kStatW];
      const int64_t vi = p.part_idx[sp * p.tokens + t];
      if (argmax_better(v, vi, M, bi)) bi = vi;  // M: the running max
      M = nan_max(M, v);
    }
    float S = 0.f, zt = 0.f, sz = 0.f;
    for (int64_t sp = 0; sp < p.nsplit; ++sp) {
      const int64_t o = (sp * p.tokens + t) * kStatW;
      S += p.part[o + 1] * expf(p.part[o] - M);
      zt += p.part[o + 2];
      sz += p.part[o + 3];
    }
    const float lse = M + logf(S);
    const int64_t tg = p.target[t];
    float loss = 0.f;
    if (tg != p.ignore_index) {
      if (p.has_cw) {
        loss = (1.f - p.eps) * static_cast<float>(p.cw[tg]) * (lse - zt);
        if (p.eps != 0.f) loss += p.eps / static_cast<float>(p.V) * (static_cast<float>(p.wsum[0]) * lse - sz);
      } else {
        loss = (1.f - p.eps) * (lse - zt);
        if (p.eps != 0.f) loss += p.eps * (lse - sz / static_cast<float>(p.V));
      }
      if (p.z_loss != 0.f) loss += p.z_loss * lse * lse;
    }
    p.lse[t] = lse;
    p.loss[t] = loss;
    p.argmax[t] = bi < p.V ? bi : 0;  // every logit -inf: torch.argmax's 0
  }
}

template <class T>
LT_DEV void bwd_body(const BwdK<T>& p) {
  const simt::sptr<float> xs = simt::dynamic_smem<float>();
  const simt::sptr<float> ws = xs + kBK * kXS;
  const simt::sptr<float> gs = ws + kBK * kWS;
  const simt::sptr<float> flags = gs + kBM * kSS;
  const int tid = static_cast<int>(simt::thread_linear()), ty = tid / 16, tx = tid % 16;
  const int warp = static_cast<int>(simt::warp_id()), lane = static_cast<int>(simt::lane_id());
  const int64_t nrb = (p.tokens + kBM - 1) / kBM, nvt = (p.V + kBN - 1) / kBN;
  const float inv_v = 1.f / static_cast<float>(p.V);
  for (int64_t rb = simt::block_idx().x; rb < nrb; rb += simt::grid_dim().x) {
    const int64_t row0 = rb * kBM;
    // this thread's two rows of the tile
    int64_t tg[kTM];
    float g[kTM], lse[kTM], wt[kTM], pa[kTM];  // pa: the factor of p without z-loss (1 without class weights)
    const float wsum = p.has_cw ? static_cast<float>(p.wsum[0]) : 0.f;
    bool live = false;
    LT_UNROLL for (int i = 0; i < kTM; ++i) {
      const int64_t gr = row0 + kTM * ty + i;
      const int64_t t = gr < p.tokens ? p.target[gr] : p.ignore_index;
      tg[i] = t == p.ignore_index ? -1 : t;
      g[i] = tg[i] >= 0 ? p.grad[gr] : 0.f;
      lse[i] = tg[i] >= 0 ? p.lse[gr] : 0.f;
      wt[i] = p.has_cw && tg[i] >= 0 ? static_cast<float>(p.cw[tg[i]]) : 1.f;
      pa[i] = p.has_cw ? (1.f - p.eps) * wt[i] + p.eps * wsum * inv_v : 1.f;
      live = live || (tg[i] >= 0 && g[i] != 0.f);
    }
    // a row block without a live row contributes exactly nothing
    const bool wlive = simt::any(simt::kFullMask, live);
    if (lane == 0) flags[warp] = wlive ? 1.f : 0.f;
    simt::sync_block();
    bool block_live = false;
    for (int wi = 0; wi < kWarps; ++wi) block_live = block_live || static_cast<float>(flags[wi]) != 0.f;
    simt::sync_block();
    if (!block_live) continue;
    for (int64_t vt = simt::block_idx().y; vt < nvt; vt += simt::grid_dim().y) {
      const int64_t col0 = vt * kBN;
      float acc[kTM][kTN];
      const Skip skip{p.target, p.ignore_index, true};
      logits_tile<T>(p.x, p.w, p.tokens, p.V, p.d, p.x_row_stride, p.w_row_stride, row0, col0, xs, ws, acc, skip);
      bool keep = false;
      LT_UNROLL for (int j = 0; j < kTN; ++j) {
        const int64_t gc = col0 + tx + 16 * j;
        const float bias = (p.has_bias && gc < p.V) ? simt::to_float(p.b[gc]) : 0.f;
        const float wc = (p.has_cw && gc < p.V) ? static_cast<float>(p.cw[gc]) : 1.f;
        LT_UNROLL for (int i = 0; i < kTM; ++i) {
          float dl = 0.f;
          if (tg[i] >= 0 && gc < p.V) {
            const float z = cap_logit(acc[i][j] + bias, p.softcap);
            const float pr = expf(z - lse[i]);
            float dz = pr * (pa[i] + 2.f * p.z_loss * lse[i]) - p.eps * inv_v * wc;
            if (gc == tg[i]) dz -= (1.f - p.eps) * wt[i];
            dl = g[i] * dz;
            if (p.softcap > 0.f) {
              const float u = z / p.softcap;
              dl *= 1.f - u * u;
            }
          }
          gs[(kTM * ty + i) * kSS + tx + 16 * j] = dl;
          keep = keep || (dl != 0.f && !(fabsf(dl) < p.filter));  // a NaN d logit is kept
        }
      }
      const bool wkeep = simt::any(simt::kFullMask, keep);
      if (lane == 0) flags[warp] = wkeep ? 1.f : 0.f;
      simt::sync_block();
      bool tile_keep = false;
      for (int wi = 0; wi < kWarps; ++wi) tile_keep = tile_keep || static_cast<float>(flags[wi]) != 0.f;
      if (!tile_keep) {
        simt::sync_block();  // flags are rewritten by the next tile
        continue;
      }
      if (p.has_bias && tid < kBN && col0 + tid < p.V) {
        float sb = 0.f;
        for (int r = 0; r < kBM; ++r) sb += gs[r * kSS + tid];
        if (sb != 0.f) simt::atomic_add(p.db + (col0 + tid), sb);
      }
      for (int64_t k0 = 0; k0 < p.d; k0 += kBK) {
        load_chunks<T>(p.x, p.w, p.tokens, p.V, p.d, p.x_row_stride, p.w_row_stride, row0, col0, k0, xs, ws, skip);
        simt::sync_block();
        const int64_t gk = k0 + lane;
        if (gk < p.d) {
          // dx[row0 + warp + kWarps i, gk] += sum_n G[r, n] W[col0 + n, gk]
          LT_UNROLL for (int i = 0; i < kBM / kWarps; ++i) {
            const int r = warp + kWarps * i;
            if (row0 + r >= p.tokens) break;
            if (p.target[row0 + r] == p.ignore_index) continue;  // an ignored row's dx stays 0, whatever W holds
            float a = 0.f;
            for (int n = 0; n < kBN; ++n) a = fmaf(gs[r * kSS + n], ws[lane * kWS + n], a);
            if (a != 0.f) simt::atomic_add(p.dx + ((row0 + r) * p.dx_row_stride + gk), a);
          }
          // dW[col0 + warp + kWarps i, gk] += sum_r G[r, n] x[row0 + r, gk]
          LT_UNROLL for (int i = 0; i < kBN / kWarps; ++i) {
            const int n = warp + kWarps * i;
            if (col0 + n >= p.V) break;
            float a = 0.f;
            for (int r = 0; r < kBM; ++r) a = fmaf(gs[r * kSS + n], xs[lane * kXS + r], a);
            if (a != 0.f) simt::atomic_add(p.dw + ((col0 + n) * p.dw_row_stride + gk), a);
          }
        }
        simt::sync_block();
      }
      simt::sync_block();  // d logits (and flags) are rewritten by the next tile even when d == 0
    }
  }
}

// out[i] = (T) in[i], grid-stride.
template <class T>
struct ConvK {
  simt::gptr<const float> in;
  simt::gptr<T> out;
  int64_t n;
};
template <class T>
LT_DEV void conv_body(const ConvK<T>& p) {
  const int64_t stride = int64_t(simt::grid_dim().x) * simt::block_dim().x;
  for (int64_t i = int64_t(simt::block_idx().x) * simt::block_dim().x + simt::thread_linear(); i < p.n; i += stride)
    p.out[i] = simt::from_float<T>(p.in[i]);
}

// ---------------------------------------------------------------- host-side helpers (both launchers)

// Grid limits of the launches. Every dimension below is walked grid-stride except the forward's
// split dimension (one block row per vocabulary split); `grid_cap` lowers the limits further
// (kNoGridCap on a GPU, the emulator's grid cap in the emulated launchers).
constexpr int64_t kRowBlockGridMax = int64_t(1) << 30, kTileGridMax = 65535, kMergeGridMax = 65535,
                  kConvGridMax = 8192;

inline LaunchCfg fwd_config(const FwdParams& fp, int64_t grid_cap) {
  const int64_t nrb = (fp.T + kBM - 1) / kBM;
  return {{static_cast<uint32_t>(std::min({nrb, kRowBlockGridMax, grid_cap})), static_cast<uint32_t>(fp.nsplit), 1},
          {kThreads, 1, 1},
          kSmemBytes};
}
inline LaunchCfg merge_config(int64_t T, int64_t grid_cap) {
  return {{grid_blocks(T, kMergeThreads, std::min(kMergeGridMax, grid_cap)), 1, 1}, {kMergeThreads, 1, 1}};
}
inline LaunchCfg bwd_config(const BwdParams& bp, int64_t grid_cap) {
  const int64_t nrb = (bp.T + kBM - 1) / kBM, nvt = (bp.V + kBN - 1) / kBN;
  return {{static_cast<uint32_t>(std::min({nrb, kRowBlockGridMax, grid_cap})),
           static_cast<uint32_t>(std::min({nvt, kTileGridMax, grid_cap})), 1},
          {kThreads, 1, 1},
          kSmemBytes};
}
inline LaunchCfg conv_config(int64_t n, int64_t grid_cap) {
  return {{grid_blocks(n, kConvThreads, std::min(kConvGridMax, grid_cap)), 1, 1}, {kConvThreads, 1, 1}};
}

template <class T>
FwdK<T> make_fwd(const FwdParams& fp) {
  FwdK<T> k;
  k.x = simt::make_gptr(static_cast<const T*>(fp.x), fp.T * fp.x_row_stride, "x");
  k.w = simt::make_gptr(static_cast<const T*>(fp.w), fp.V * fp.w_row_stride, "weight");
  k.b = simt::make_gptr(static_cast<const T*>(fp.b), fp.b ? fp.V : 0, "bias");
  k.target = simt::make_gptr(fp.target, fp.T, "target");
  k.part = simt::make_gptr(fp.part, fp.nsplit * fp.T * kStatW, "partial states");
  k.loss = simt::make_gptr(fp.loss, fp.T, "loss");
  k.lse = simt::make_gptr(fp.lse, fp.T, "lse");
  k.part_idx = simt::make_gptr(fp.part_idx, fp.nsplit * fp.T, "partial argmax");
  k.argmax = simt::make_gptr(fp.argmax, fp.T, "argmax");
  k.cw = simt::make_gptr(fp.cw, fp.cw ? fp.V : 0, "class_weight (fp32)");
  k.wsum = simt::make_gptr(fp.wsum, fp.wsum ? 1 : 0, "class_weight sum");
  k.has_cw = fp.cw != nullptr;
  k.tokens = fp.T; k.d = fp.d; k.V = fp.V; k.ignore_index = fp.ignore_index;
  k.nsplit = fp.nsplit; k.tiles_per_split = fp.tiles_per_split;
  k.x_row_stride = fp.x_row_stride; k.w_row_stride = fp.w_row_stride;
  k.eps = fp.eps; k.z_loss = fp.z_loss; k.softcap = fp.softcap;
  k.has_bias = fp.b != nullptr;
  return k;
}

template <class T>
BwdK<T> make_bwd(const BwdParams& bp) {
  BwdK<T> k;
  k.grad = simt::make_gptr(bp.grad, bp.T, "grad_loss");
  k.lse = simt::make_gptr(bp.lse, bp.T, "lse");
  k.x = simt::make_gptr(static_cast<const T*>(bp.x), bp.T * bp.x_row_stride, "x");
  k.w = simt::make_gptr(static_cast<const T*>(bp.w), bp.V * bp.w_row_stride, "weight");
  k.b = simt::make_gptr(static_cast<const T*>(bp.b), bp.b ? bp.V : 0, "bias");
  k.target = simt::make_gptr(bp.target, bp.T, "target");
  k.dx = simt::make_gptr(bp.dx32, bp.T * bp.dx_row_stride, "dx (fp32)");
  k.dw = simt::make_gptr(bp.dw32, bp.V * bp.dw_row_stride, "dweight (fp32)");
  k.db = simt::make_gptr(bp.db32, bp.db32 ? bp.V : 0, "dbias (fp32)");
  k.cw = simt::make_gptr(bp.cw, bp.cw ? bp.V : 0, "class_weight (fp32)");
  k.wsum = simt::make_gptr(bp.wsum, bp.wsum ? 1 : 0, "class_weight sum");
  k.has_cw = bp.cw != nullptr;
  k.tokens = bp.T; k.d = bp.d; k.V = bp.V; k.ignore_index = bp.ignore_index;
  k.x_row_stride = bp.x_row_stride; k.w_row_stride = bp.w_row_stride;
  k.dx_row_stride = bp.dx_row_stride; k.dw_row_stride = bp.dw_row_stride;
  k.eps = bp.eps; k.z_loss = bp.z_loss; k.softcap = bp.softcap; k.filter = bp.filter;
  k.has_bias = bp.b != nullptr;
  return k;
}

template <class T>
ConvK<T> make_conv(const float* in, void* out, int64_t n, const char* name) {
  ConvK<T> k;
  k.in = simt::make_gptr(in, n, "fp32 accumulator");
  k.out = simt::make_gptr(static_cast<T*>(out), n, name);
  k.n = n;
  return k;
}

}  // namespace lt::cross_entropy
