// Device code of the fused linear + cross-entropy (intrinsics layer: GPU and CPU emulator).
//
// Logits are never materialised: a block takes kBM rows of x and kBN-column vocabulary tiles of W
// and accumulates the kBM x kBN logits tile in fp32 registers, kBK hidden columns at a time. Warp w
// owns rows 16 (w % 4) .. + 16 and columns kWN (w / 4) .. + kWN of the tile, in the C fragment
// layout of mma.m16n8k16 (g = lane / 4, c = lane % 4: rows g and g + 8, columns 2c and 2c + 1 of
// each 8-column block):
//  - fp16 / bf16: tensor cores. The x and W chunks are staged in shared memory as they are stored
//    (16-bit, rows padded to kLD elements so that ldmatrix is conflict-free), double-buffered with
//    cp.async (16-byte copies when the rows are 16-byte aligned; element loads at a ragged end of
//    the hidden dimension, for unaligned rows and for zero fill), read with ldmatrix and multiplied
//    with mma.m16n8k16 (fp32 accumulate).
//  - fp32: scalar FMAs (the tensor cores take no fp32 operands without rounding them): the chunks
//    are staged in fp32, transposed, single-buffered, and each thread accumulates its fragment
//    elements with fmaf.
// The tile then goes through shared memory:
//  - forward: warp w owns rows kRW w .. kRW w + kRW - 1 and keeps their online state (max, its first
//    column, sum exp(z - max), z[target], sum (w_c) z) in registers over the tiles of its vocabulary
//    split; the states are written per (split, row) to an fp32 scratch (the argmax to an int64 one)
//    and a merge kernel (one thread per row) forms lse, loss and argmax.
//  - class weights w (optional): loss_t = (1 - eps) w_t (lse - z_t) + eps / V sum_c w_c (lse - z_c)
//    + z_loss lse^2, d loss / dz_c = p_c ((1 - eps) w_t + eps sum(w) / V + 2 z_loss lse)
//    - eps w_c / V - (1 - eps) w_t [c == t]; without them every w is 1 (the same arithmetic).
//  - backward: one block per (row block, vocabulary tile) recomputes the tile, forms d logits G
//    (skipping the tile when every |d logit| is 0 or below filter_eps), and accumulates
//    dx += G W_tile and dW_tile += G^T x chunk by chunk of the hidden dimension with fp32 atomics
//    (dx and dW both: no block owns a whole row of either without holding d floats per row, or
//    recomputing the logits once per hidden chunk), and dbias with one atomic per column; atomics
//    adding an exact 0 are skipped. Where the grid makes a block the only one adding to a dx row
//    (one block column) or a dW row (one block row), plain adds replace the atomics. In fp16 /
//    bf16 both products run on mma.m16n8k16 too: G is rounded to the input dtype (as the d logits
//    of F.cross_entropy in that dtype are), in fp16 after scaling the tile by a power of two that
//    puts its largest finite |d logit| in [2^14, 2^15) (exact, undone on the fp32 results, so that
//    small d logits do not underflow); x and W chunks are double-buffered with cp.async. In fp32
//    both are scalar FMAs. fp16/bf16 results go through fp32 accumulators and a convert kernel.
//  - one pass (linear_cross_entropy_fwd_bwd, per-row loss weights known up front): per chunk of
//    rows, the forward kernel (kStore) also writes each row's capped logits to an fp32 scratch
//    [rows, V], the merge kernel forms lse / loss / argmax, and the backward kernel (kStored) reads
//    the logits tile from the scratch instead of recomputing it, then proceeds as above (d logits,
//    skipping, rounding, dx / dW products): 3 GEMMs instead of 4. Without weight_grad the dW
//    product and dbias are skipped.
// All index math is 64-bit; rows / columns / hidden indices past the ends load as 0 and are masked.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/nonfinite.h"
#include "common/simt/simt.h"
#include "cuda/common/launch.h"
#include "cuda/cross_entropy/cross_entropy_params.h"

namespace lt::cross_entropy {

constexpr int kWarps = kThreads / 32;
constexpr int kRW = kBM / kWarps;  // rows per warp in the forward's softmax pass
constexpr int kCL = kBN / 32;      // columns per lane in the forward's softmax pass
// fragment layout of the logits tile: kWR x kWC warps of 16 rows x kWN columns
constexpr int kWR = kBM / 16, kWC = kWarps / kWR, kWN = kBN / kWC, kNB = kWN / 8;
constexpr int kDK = kBK / kWC;  // hidden columns per warp in the backward's dx / dW products
static_assert(kThreads == 256 && kBM == 64 && kBN == 64 && kBK == 32 && kRW <= 32, "tile shape");
static_assert(kWR * kWC == kWarps && kNB % 2 == 0 && kDK == 16, "warp layout");
// fp32 staging: x and W chunks transposed, [kBK][kXS] and [kBK][kWS]
constexpr int kXS = kBM + 1, kWS = kBN + 1;
static_assert((kBM * kBK) % kThreads == 0 && (kBN * kBK) % kThreads == 0, "chunk loads");
// 16-bit staging: a stage holds x rows [kBM][kLD] then W rows [kBN][kLD]; two stages
constexpr int kLD = kBK + 8;
constexpr int kStage = (kBM + kBN) * kLD;
static_assert((kBM * kBK / 8) % kThreads == 0 && kBM == kBN, "16-byte chunk loads");
constexpr int kGL = kBN + 8;  // 16-bit d logits tile: [kBM][kGL]
constexpr int kSS = kBN + 1;  // fp32 logits / d logits tile: [kBM][kSS]
// shared memory: staging | fp32 tile | 16-bit d logits | per-warp flags (2 per warp)
constexpr size_t kStageBytes = std::max(sizeof(float) * kBK * (kXS + kWS), size_t(2) * 2 * kStage);
constexpr size_t kTileOff = kStageBytes;
constexpr size_t kGhOff = kTileOff + sizeof(float) * kBM * kSS;
constexpr size_t kFlagOff = kGhOff + size_t(2) * kBM * kGL;
constexpr size_t kSmemBytes = kFlagOff + sizeof(float) * 2 * kWarps;
static_assert(kStageBytes % 16 == 0 && kGhOff % 16 == 0 && kSmemBytes <= 48 * 1024, "shared memory layout");
constexpr int kMergeThreads = 256;
constexpr int kConvThreads = 256;

template <class T>
struct FwdK {
  simt::gptr<const T> x, w, b;
  simt::gptr<const int64_t> target;
  simt::gptr<float> part, loss, lse;
  simt::gptr<int64_t> part_idx, argmax;
  simt::gptr<const float> cw, wsum;
  simt::gptr<float> zs;  // one-pass: the capped logits [tokens][V] (fp32 scratch), written tile by tile
  int64_t tokens, d, V, ignore_index, nsplit, tiles_per_split;
  int64_t x_row_stride, w_row_stride;
  float eps, z_loss, softcap;
  bool has_bias, has_cw, vec;  // vec: x and W rows 16-byte aligned (cp.async of 8 16-bit elements)
};

template <class T>
struct BwdK {
  simt::gptr<const float> grad, lse;
  simt::gptr<const T> x, w, b;
  simt::gptr<const int64_t> target;
  simt::gptr<float> dx, dw, db;
  simt::gptr<const float> cw, wsum;
  simt::gptr<const float> zs;  // one-pass: the capped logits [tokens][V] the forward stored
  int64_t tokens, d, V, ignore_index;
  int64_t x_row_stride, w_row_stride, dx_row_stride, dw_row_stride;
  float eps, z_loss, softcap, filter;
  bool has_bias, has_cw, vec;
  bool wgrad;  // dW and dbias wanted (weight_grad=False: dx only)
};

// The operands of a logits tile.
template <class T>
struct Src {
  simt::gptr<const T> x, w;
  int64_t tokens, V, d, x_row_stride, w_row_stride;
  bool vec;
};
template <class T, class K>
LT_DEV Src<T> make_src(const K& p) {
  return Src<T>{p.x, p.w, p.tokens, p.V, p.d, p.x_row_stride, p.w_row_stride, p.vec};
}

// Rows whose target is ignore_index, for the backward: they read nothing, so their x rows are staged
// as zeros (a NaN there must not reach dW through their zero d logits).
struct Skip {
  simt::gptr<const int64_t> target;
  int64_t ignore_index;
  bool on;
};

template <class U>
LT_DEV simt::sptr<U> smem_at(size_t byte_offset) {
  return simt::sptr<U>(reinterpret_cast<U*>(simt::raw(simt::dynamic_smem<unsigned char>()) + byte_offset));
}

// The fragment element t of 8-column block nb: row and column in the tile.
LT_DEV int frag_row(int t) {
  return 16 * (static_cast<int>(simt::warp_id()) % kWR) + static_cast<int>(simt::lane_id()) / 4 + 8 * (t >> 1);
}
LT_DEV int frag_col(int nb, int t) {
  return kWN * (static_cast<int>(simt::warp_id()) / kWR) + 8 * nb + 2 * (static_cast<int>(simt::lane_id()) % 4) +
         (t & 1);
}

template <class T>
LT_DEV void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  if constexpr (std::is_same_v<T, simt::bf16>) simt::mma_m16n8k16_bf16(d, a, b, d);
  else simt::mma_m16n8k16_f16(d, a, b, d);
}

// fp32: stages x[row0 : row0+kBM, k0 : k0+kBK] and W[col0 : col0+kBN, k0 : k0+kBK] (transposed).
LT_DEV void load_chunks(const Src<float>& s, int64_t row0, int64_t col0, int64_t k0, simt::sptr<float> xs,
                        simt::sptr<float> ws, const Skip& skip) {
  const int tid = static_cast<int>(simt::thread_linear());
  LT_UNROLL for (int q = 0; q < kBM * kBK / kThreads; ++q) {
    const int e = tid + q * kThreads, r = e / kBK, k = e % kBK;
    const int64_t gr = row0 + r, gk = k0 + k;
    const bool read = gr < s.tokens && gk < s.d && !(skip.on && skip.target[gr] == skip.ignore_index);
    xs[k * kXS + r] = read ? s.x[gr * s.x_row_stride + gk] : 0.f;
  }
  LT_UNROLL for (int q = 0; q < kBN * kBK / kThreads; ++q) {
    const int e = tid + q * kThreads, n = e / kBK, k = e % kBK;
    const int64_t gn = col0 + n, gk = k0 + k;
    ws[k * kWS + n] = (gn < s.V && gk < s.d) ? s.w[gn * s.w_row_stride + gk] : 0.f;
  }
}

// 16-bit: stages rows r0 .. r0 + kBM of src, hidden columns k0 .. k0 + kBK, into dst ([kBM][kLD]);
// rows past nrows, skipped rows and columns past d are zeros.
template <class T>
LT_DEV void stage_rows(simt::sptr<T> dst, simt::gptr<const T> src, int64_t stride, int64_t r0, int64_t nrows,
                       int64_t d, int64_t k0, bool vec, const Skip& skip) {
  constexpr int C = kBK / 8;  // 8-element chunks per row
  const int tid = static_cast<int>(simt::thread_linear());
  LT_UNROLL for (int q = 0; q < kBM * C / kThreads; ++q) {
    const int e = tid + q * kThreads, r = e / C, c = (e % C) * 8;
    const int64_t gr = r0 + r, gk = k0 + c;
    const bool row = gr < nrows && !(skip.on && skip.target[gr] == skip.ignore_index);
    const simt::sptr<T> to = dst + (r * kLD + c);
    if (row && vec && gk + 8 <= d) {
      simt::cp_async_16(to, src + (gr * stride + gk));
    } else {
      T v[8];
      LT_UNROLL for (int t = 0; t < 8; ++t) v[t] = row && gk + t < d ? static_cast<T>(src[gr * stride + gk + t]) : T{0};
      simt::st_vec<8>(to, 0, v);
    }
  }
}
// One pipeline stage: the x chunk, then the W chunk.
template <class T>
LT_DEV void stage_chunk(const Src<T>& s, int64_t row0, int64_t col0, int64_t k0, simt::sptr<T> stage,
                        const Skip& skip) {
  stage_rows<T>(stage, s.x, s.x_row_stride, row0, s.tokens, s.d, k0, s.vec, skip);
  stage_rows<T>(stage + kBM * kLD, s.w, s.w_row_stride, col0, s.V, s.d, k0, s.vec, Skip{skip.target, 0, false});
}

// acc[nb][t] = sum_k x[row0 + frag_row(t), k] W[col0 + frag_col(nb, t), k].
template <class T>
LT_DEV void logits_tile(const Src<T>& s, int64_t row0, int64_t col0, float (&acc)[kNB][4], const Skip& skip) {
  LT_UNROLL for (int nb = 0; nb < kNB; ++nb) LT_UNROLL for (int t = 0; t < 4; ++t) acc[nb][t] = 0.f;
  if constexpr (std::is_same_v<T, float>) {
    const simt::sptr<float> xs = smem_at<float>(0);
    const simt::sptr<float> ws = xs + kBK * kXS;
    const int r0 = frag_row(0), c0 = frag_col(0, 0);
    for (int64_t k0 = 0; k0 < s.d; k0 += kBK) {
      load_chunks(s, row0, col0, k0, xs, ws, skip);
      simt::sync_block();
      const int kn = s.d - k0 < kBK ? static_cast<int>(s.d - k0) : kBK;
      for (int k = 0; k < kn; ++k) {
        float a[2], bv[kNB][2];
        LT_UNROLL for (int h = 0; h < 2; ++h) a[h] = xs[k * kXS + r0 + 8 * h];
        LT_UNROLL for (int nb = 0; nb < kNB; ++nb) {
          LT_UNROLL for (int cc = 0; cc < 2; ++cc) bv[nb][cc] = ws[k * kWS + c0 + 8 * nb + cc];
        }
        LT_UNROLL for (int nb = 0; nb < kNB; ++nb) {
          LT_UNROLL for (int t = 0; t < 4; ++t) acc[nb][t] = fmaf(a[t >> 1], bv[nb][t & 1], acc[nb][t]);
        }
      }
      simt::sync_block();
    }
  } else {
    const int lane = static_cast<int>(simt::lane_id()), warp = static_cast<int>(simt::warp_id());
    const int wr = warp % kWR, wc = warp / kWR;
    const simt::sptr<T> st = smem_at<T>(0);
    const int64_t nk = (s.d + kBK - 1) / kBK;
    if (nk > 0) {
      stage_chunk<T>(s, row0, col0, 0, st, skip);
      simt::cp_async_commit();
    }
    for (int64_t kc = 0; kc < nk; ++kc) {
      if (kc + 1 < nk) {
        stage_chunk<T>(s, row0, col0, (kc + 1) * kBK, st + ((kc + 1) & 1) * kStage, skip);
        simt::cp_async_commit();
        simt::cp_async_wait<1>();
      } else {
        simt::cp_async_wait<0>();
      }
      simt::sync_block();
      const simt::sptr<T> xb = st + (kc & 1) * kStage, wb = xb + kBM * kLD;
      LT_UNROLL for (int ks = 0; ks < kBK / 16; ++ks) {
        uint32_t a[4];
        simt::ldmatrix_x4(a, xb + ((16 * wr + lane % 16) * kLD + 16 * ks + (lane / 16) * 8));
        LT_UNROLL for (int nb2 = 0; nb2 < kNB / 2; ++nb2) {
          uint32_t bb[4];
          simt::ldmatrix_x4(bb, wb + ((kWN * wc + 16 * nb2 + (lane / 16) * 8 + lane % 8) * kLD + 16 * ks +
                                      ((lane / 8) % 2) * 8));
          mma<T>(acc[2 * nb2], a, bb[0], bb[1]);
          mma<T>(acc[2 * nb2 + 1], a, bb[2], bb[3]);
        }
      }
      simt::sync_block();  // the next chunk's copies overwrite the other stage, the next tile's this one
    }
  }
}

// The capped logit z from the raw product (bias added in fp32).
LT_DEV float cap_logit(float l, float softcap) { return softcap > 0.f ? softcap * tanhf(l / softcap) : l; }

// kStore (the one-pass forward): also writes each row's capped logits z to p.zs.
template <class T, bool kStore = false>
LT_DEV void fwd_body(const FwdK<T>& p) {
  const simt::sptr<float> ss = smem_at<float>(kTileOff);
  const int warp = static_cast<int>(simt::warp_id()), lane = static_cast<int>(simt::lane_id());
  const int64_t nrb = (p.tokens + kBM - 1) / kBM, nvt = (p.V + kBN - 1) / kBN;
  const int64_t split = simt::block_idx().y;
  const int64_t vt0 = split * p.tiles_per_split, vt1 = vt0 + p.tiles_per_split < nvt ? vt0 + p.tiles_per_split : nvt;
  const Src<T> src = make_src<T>(p);
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
      float acc[kNB][4];
      logits_tile<T>(src, row0, col0, acc, Skip{p.target, p.ignore_index, false});
      LT_UNROLL for (int nb = 0; nb < kNB; ++nb) {
        LT_UNROLL for (int cc = 0; cc < 2; ++cc) {
          const int c = frag_col(nb, cc);
          const int64_t gc = col0 + c;
          const float bias = (p.has_bias && gc < p.V) ? simt::to_float(p.b[gc]) : 0.f;
          LT_UNROLL for (int h = 0; h < 2; ++h)
            ss[frag_row(2 * h) * kSS + c] = cap_logit(acc[nb][2 * h + cc] + bias, p.softcap);
        }
      }
      simt::sync_block();
      if constexpr (kStore) {  // the tile to the logits scratch, row by row (consecutive threads: columns)
        for (int e = static_cast<int>(simt::thread_linear()); e < kBM * kBN; e += kThreads) {
          const int64_t gr = row0 + e / kBN, gc = col0 + e % kBN;
          if (gr < p.tokens && gc < p.V) p.zs[gr * p.V + gc] = static_cast<float>(ss[(e / kBN) * kSS + e % kBN]);
        }
      }
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

// Owners of the backward's accumulators: with one block column (grid y == 1) a block walks every
// vocabulary tile of its row blocks, so it alone adds to their dx rows; with one block row (grid x
// == 1) it walks every row block of its vocabulary tiles and alone adds to their dW rows and dbias
// columns. Each element is then always added to by the same thread (the layouts below are fixed),
// so a plain read-modify-write replaces the atomic.
LT_DEV bool dx_owned() { return simt::grid_dim().y == 1; }
LT_DEV bool dw_owned() { return simt::grid_dim().x == 1; }
LT_DEV void accumulate(simt::gptr<float> q, float v, bool owned) {
  if (owned) q[0] = q[0] + v;
  else simt::atomic_add(q, v);
}

// 16-bit backward products of one hidden chunk (x and W chunks staged in `stage`, G in gh scaled by
// 1 / inv): dx[row0 + r, k0 + ..] += G W_chunk and dW[col0 + n, k0 + ..] += G^T x_chunk, warp
// (wr, wc) owning rows (or vocabulary columns) 16 wr .. + 16 and hidden columns kDK wc .. + kDK.
template <class T>
LT_DEV void dxdw_chunk(const BwdK<T>& p, int64_t row0, int64_t col0, int64_t k0, simt::sptr<T> stage,
                       simt::sptr<T> gh, float inv, const bool (&row_live)[2]) {
  const int lane = static_cast<int>(simt::lane_id()), warp = static_cast<int>(simt::warp_id());
  const int wr = warp % kWR, wc = warp / kWR, g = lane / 4, c4 = lane % 4;
  const simt::sptr<T> xb = stage, wb = stage + kBM * kLD;
  float ax[2][4], aw[2][4];
  LT_UNROLL for (int nb = 0; nb < 2; ++nb) LT_UNROLL for (int t = 0; t < 4; ++t) ax[nb][t] = aw[nb][t] = 0.f;
  LT_UNROLL for (int ks = 0; ks < kBM / 16; ++ks) {
    // dx: A = G (rows r, k = n), B = W chunk stored [n][k] (transposed load)
    uint32_t a[4], bb[4];
    simt::ldmatrix_x4(a, gh + ((16 * wr + lane % 16) * kGL + 16 * ks + (lane / 16) * 8));
    simt::ldmatrix_x4<true>(bb, wb + ((16 * ks + ((lane / 8) % 2) * 8 + lane % 8) * kLD + kDK * wc + (lane / 16) * 8));
    mma<T>(ax[0], a, bb[0], bb[1]);
    mma<T>(ax[1], a, bb[2], bb[3]);
    if (!p.wgrad) continue;  // uniform over the block
    // dW: A = G^T (rows n, k = r) from G stored [r][n] (transposed load), B = x chunk stored [r][k]
    simt::ldmatrix_x4<true>(a, gh + ((16 * ks + (lane / 16) * 8 + lane % 8) * kGL + 16 * wr + ((lane / 8) % 2) * 8));
    simt::ldmatrix_x4<true>(bb, xb + ((16 * ks + ((lane / 8) % 2) * 8 + lane % 8) * kLD + kDK * wc + (lane / 16) * 8));
    mma<T>(aw[0], a, bb[0], bb[1]);
    mma<T>(aw[1], a, bb[2], bb[3]);
  }
  LT_UNROLL for (int nb = 0; nb < 2; ++nb) {
    LT_UNROLL for (int t = 0; t < 4; ++t) {
      const int r = 16 * wr + g + 8 * (t >> 1);
      const int64_t gk = k0 + kDK * wc + 8 * nb + 2 * c4 + (t & 1);
      if (gk >= p.d) continue;
      const float vx = ax[nb][t] * inv, vw = aw[nb][t] * inv;
      // an ignored row's dx stays 0, whatever W holds
      if (row_live[t >> 1] && vx != 0.f) accumulate(p.dx + ((row0 + r) * p.dx_row_stride + gk), vx, dx_owned());
      if (p.wgrad && col0 + r < p.V && vw != 0.f) accumulate(p.dw + ((col0 + r) * p.dw_row_stride + gk), vw, dw_owned());
    }
  }
}

// The logits tile at (row0, col0) that the one-pass forward stored (p.zs), in the fragment layout of
// logits_tile; rows / columns past the ends read as 0 (their d logits are 0 anyway).
template <class T>
LT_DEV void stored_tile(const BwdK<T>& p, int64_t row0, int64_t col0, float (&acc)[kNB][4]) {
  LT_UNROLL for (int nb = 0; nb < kNB; ++nb) {
    LT_UNROLL for (int t = 0; t < 4; ++t) {
      const int64_t gr = row0 + frag_row(t), gc = col0 + frag_col(nb, t);
      acc[nb][t] = gr < p.tokens && gc < p.V ? static_cast<float>(p.zs[gr * p.V + gc]) : 0.f;
    }
  }
}

// kStored (the one-pass backward): the logits come from p.zs (capped, bias added) instead of being
// recomputed: two GEMMs per tile (dx, dW) instead of three.
template <class T, bool kStored = false>
LT_DEV void bwd_body(const BwdK<T>& p) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  const simt::sptr<float> gs = smem_at<float>(kTileOff);
  const simt::sptr<T> gh = smem_at<T>(kGhOff);
  const simt::sptr<float> flags = smem_at<float>(kFlagOff);  // [kWarps] keep / live, [kWarps] max |G|
  const int tid = static_cast<int>(simt::thread_linear());
  const int warp = static_cast<int>(simt::warp_id()), lane = static_cast<int>(simt::lane_id());
  const int64_t nrb = (p.tokens + kBM - 1) / kBM, nvt = (p.V + kBN - 1) / kBN;
  const float inv_v = 1.f / static_cast<float>(p.V);
  const Src<T> src = make_src<T>(p);
  for (int64_t rb = simt::block_idx().x; rb < nrb; rb += simt::grid_dim().x) {
    const int64_t row0 = rb * kBM;
    // this thread's two rows of the tile (fragment rows)
    int64_t tg[2];
    float g[2], lse[2], wt[2], pa[2];  // pa: the factor of p without z-loss (1 without class weights)
    bool row_live[2];                  // a non-ignored row (its dx is written)
    const float wsum = p.has_cw ? static_cast<float>(p.wsum[0]) : 0.f;
    bool live = false;
    LT_UNROLL for (int h = 0; h < 2; ++h) {
      const int64_t gr = row0 + frag_row(2 * h);
      const int64_t t = gr < p.tokens ? p.target[gr] : p.ignore_index;
      tg[h] = t == p.ignore_index ? -1 : t;
      row_live[h] = tg[h] >= 0;
      g[h] = tg[h] >= 0 ? p.grad[gr] : 0.f;
      lse[h] = tg[h] >= 0 ? p.lse[gr] : 0.f;
      wt[h] = p.has_cw && tg[h] >= 0 ? static_cast<float>(p.cw[tg[h]]) : 1.f;
      pa[h] = p.has_cw ? (1.f - p.eps) * wt[h] + p.eps * wsum * inv_v : 1.f;
      live = live || (tg[h] >= 0 && g[h] != 0.f);
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
      float acc[kNB][4];
      const Skip skip{p.target, p.ignore_index, true};
      if constexpr (kStored) stored_tile<T>(p, row0, col0, acc);
      else logits_tile<T>(src, row0, col0, acc, skip);
      bool keep = false;
      float gmax = 0.f;  // largest finite |d logit| of this thread
      LT_UNROLL for (int nb = 0; nb < kNB; ++nb) {
        LT_UNROLL for (int cc = 0; cc < 2; ++cc) {
          const int c = frag_col(nb, cc);
          const int64_t gc = col0 + c;
          const float bias = (p.has_bias && gc < p.V) ? simt::to_float(p.b[gc]) : 0.f;
          const float wc = (p.has_cw && gc < p.V) ? static_cast<float>(p.cw[gc]) : 1.f;
          LT_UNROLL for (int h = 0; h < 2; ++h) {
            float dl = 0.f;
            if (tg[h] >= 0 && gc < p.V) {
              const float z = kStored ? acc[nb][2 * h + cc] : cap_logit(acc[nb][2 * h + cc] + bias, p.softcap);
              const float pr = expf(z - lse[h]);
              float dz = pr * (pa[h] + 2.f * p.z_loss * lse[h]) - p.eps * inv_v * wc;
              if (gc == tg[h]) dz -= (1.f - p.eps) * wt[h];
              dl = g[h] * dz;
              if (p.softcap > 0.f) {
                const float u = z / p.softcap;
                dl *= 1.f - u * u;
              }
            }
            gs[frag_row(2 * h) * kSS + c] = dl;
            keep = keep || (dl != 0.f && !(fabsf(dl) < p.filter));  // a NaN d logit is kept
            if (fabsf(dl) < INFINITY) gmax = fmaxf(gmax, fabsf(dl));
          }
        }
      }
      const bool wkeep = simt::any(simt::kFullMask, keep);
      for (int off = 16; off >= 1; off /= 2) gmax = fmaxf(gmax, simt::shfl_xor(simt::kFullMask, gmax, off));
      if (lane == 0) {
        flags[warp] = wkeep ? 1.f : 0.f;
        flags[kWarps + warp] = gmax;
      }
      simt::sync_block();
      bool tile_keep = false;
      float tmax = 0.f;
      for (int wi = 0; wi < kWarps; ++wi) {
        tile_keep = tile_keep || static_cast<float>(flags[wi]) != 0.f;
        tmax = fmaxf(tmax, static_cast<float>(flags[kWarps + wi]));
      }
      if (!tile_keep) {
        simt::sync_block();  // flags are rewritten by the next tile
        continue;
      }
      if (p.has_bias && p.wgrad && tid < kBN && col0 + tid < p.V) {
        float sb = 0.f;
        for (int r = 0; r < kBM; ++r) sb += gs[r * kSS + tid];
        if (sb != 0.f) accumulate(p.db + (col0 + tid), sb, dw_owned());
      }
      if constexpr (kF32) {
        const simt::sptr<float> xs = smem_at<float>(0);
        const simt::sptr<float> ws = xs + kBK * kXS;
        for (int64_t k0 = 0; k0 < p.d; k0 += kBK) {
          load_chunks(src, row0, col0, k0, xs, ws, skip);
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
              if (a != 0.f) accumulate(p.dx + ((row0 + r) * p.dx_row_stride + gk), a, dx_owned());
            }
            // dW[col0 + warp + kWarps i, gk] += sum_r G[r, n] x[row0 + r, gk]
            LT_UNROLL for (int i = 0; i < kBN / kWarps; ++i) {
              const int n = warp + kWarps * i;
              if (!p.wgrad || col0 + n >= p.V) break;
              float a = 0.f;
              for (int r = 0; r < kBM; ++r) a = fmaf(gs[r * kSS + n], xs[lane * kXS + r], a);
              if (a != 0.f) accumulate(p.dw + ((col0 + n) * p.dw_row_stride + gk), a, dw_owned());
            }
          }
          simt::sync_block();
        }
      } else {
        // G as T (fp16: scaled by a power of two, its largest finite |d logit| into [2^14, 2^15))
        float scale = 1.f, inv = 1.f;
        if (std::is_same_v<T, simt::f16> && tmax > 0.f) {
          const int e = static_cast<int>((simt::float_bits(tmax) >> 23) & 0xffu);  // biased exponent
          int se = 141 - e;                                                          // 14 - unbiased exponent
          se = se < -126 ? -126 : (se > 126 ? 126 : se);
          scale = simt::bits_float(static_cast<uint32_t>(127 + se) << 23);
          inv = simt::bits_float(static_cast<uint32_t>(127 - se) << 23);
        }
        for (int e = tid; e < kBM * kBN; e += kThreads) {
          const int r = e / kBN, n = e % kBN;
          gh[r * kGL + n] = simt::from_float<T>(static_cast<float>(gs[r * kSS + n]) * scale);
        }
        // (the first chunk's barrier below orders these stores before the ldmatrix reads)
        simt::sptr<T> st = smem_at<T>(0);
        const int64_t nk = (p.d + kBK - 1) / kBK;
        if (nk > 0) {
          stage_chunk<T>(src, row0, col0, 0, st, skip);
          simt::cp_async_commit();
        }
        for (int64_t kc = 0; kc < nk; ++kc) {
          if (kc + 1 < nk) {
            stage_chunk<T>(src, row0, col0, (kc + 1) * kBK, st + ((kc + 1) & 1) * kStage, skip);
            simt::cp_async_commit();
            simt::cp_async_wait<1>();
          } else {
            simt::cp_async_wait<0>();
          }
          simt::sync_block();
          dxdw_chunk<T>(p, row0, col0, kc * kBK, st + (kc & 1) * kStage, gh, inv, row_live);
          simt::sync_block();  // the next chunk's copies overwrite the other stage
        }
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

// Rows of 16-bit elements that start on 16-byte boundaries (cp.async of 8-element chunks).
inline bool rows_aligned16(const void* base, int64_t row_stride, size_t elem) {
  return elem == 2 && reinterpret_cast<uintptr_t>(base) % 16 == 0 && (row_stride * int64_t(elem)) % 16 == 0;
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
  k.zs = simt::make_gptr(fp.logits, fp.logits ? fp.T * fp.V : 0, "logits (fp32 scratch)");
  k.has_cw = fp.cw != nullptr;
  k.tokens = fp.T; k.d = fp.d; k.V = fp.V; k.ignore_index = fp.ignore_index;
  k.nsplit = fp.nsplit; k.tiles_per_split = fp.tiles_per_split;
  k.x_row_stride = fp.x_row_stride; k.w_row_stride = fp.w_row_stride;
  k.eps = fp.eps; k.z_loss = fp.z_loss; k.softcap = fp.softcap;
  k.has_bias = fp.b != nullptr;
  k.vec = rows_aligned16(fp.x, fp.x_row_stride, sizeof(T)) && rows_aligned16(fp.w, fp.w_row_stride, sizeof(T));
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
  k.dw = simt::make_gptr(bp.dw32, bp.wgrad ? bp.V * bp.dw_row_stride : 0, "dweight (fp32)");
  k.db = simt::make_gptr(bp.db32, bp.db32 ? bp.V : 0, "dbias (fp32)");
  k.cw = simt::make_gptr(bp.cw, bp.cw ? bp.V : 0, "class_weight (fp32)");
  k.wsum = simt::make_gptr(bp.wsum, bp.wsum ? 1 : 0, "class_weight sum");
  k.zs = simt::make_gptr(bp.logits, bp.logits ? bp.T * bp.V : 0, "logits (fp32 scratch)");
  k.wgrad = bp.wgrad;
  k.has_cw = bp.cw != nullptr;
  k.tokens = bp.T; k.d = bp.d; k.V = bp.V; k.ignore_index = bp.ignore_index;
  k.x_row_stride = bp.x_row_stride; k.w_row_stride = bp.w_row_stride;
  k.dx_row_stride = bp.dx_row_stride; k.dw_row_stride = bp.dw_row_stride;
  k.eps = bp.eps; k.z_loss = bp.z_loss; k.softcap = bp.softcap; k.filter = bp.filter;
  k.has_bias = bp.b != nullptr;
  k.vec = rows_aligned16(bp.x, bp.x_row_stride, sizeof(T)) && rows_aligned16(bp.w, bp.w_row_stride, sizeof(T));
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
