// Device code of the block-sparse flash-attention kernels (intrinsics layer: runs on a GPU and on
// the CPU emulator). FlashAttention-2 structure:
//  forward  one block (4 warps x 16 query rows) per (query tile, output head, sequence); loops only
//           over the key tiles the mask touches (tile_ranges<true>), K/V tiles double-buffered with
//           cp.async; S = Q K^T and O += P V on mma.m16n8k16 (fp32 accumulate), online softmax in
//           fp32 (exp2 of scale*log2e-scaled scores); elements tested against the mask only in tiles a
//           row does not cover completely (and under key padding / past the sequence end).
//  backward dsum_body: Dsum = rowsum(dO * O); bwd_body: one block (row groups of 16 key rows, of
//           kBwdColSplit warps each: AttnTraits) per (key tile, kv head, sequence) loops over the
//           output heads reading that kv head and over the
//           query tiles the mask touches (tile_ranges<false>): recompute P^T = exp(S^T*scale - lse),
//           dV += P^T dO, dP^T = V dO^T, dS^T = P^T o (dP^T - Dsum), dK += dS^T Q (scaled at the end),
//           dQ += dS K via dS^T in shared memory and fp32 atomics into dq_acc; dk / dv written once.
//           dq_convert_body scales dq_acc into dq's dtype.
// Fragment layouts (PTX ISA, mma.m16n8k16 / ldmatrix), g = lane / 4, c = lane % 4:
//  A (16x16): a0 (g, 2c..2c+1), a1 (g+8, ..), a2 (g, 2c+8..), a3 (g+8, 2c+8..)
//  B (16x8):  b0 (k = 2c..2c+1, n = g), b1 (k + 8)          C/D (16x8): (g, 2c..2c+1), (g+8, ..)
#pragma once
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/attn_mask.h"
#include "common/nonfinite.h"
#include "common/simt/simt.h"
#include "cuda/attention/attn_params.h"

namespace lt::attn {

template <class T>
struct AKParams {
  simt::gptr<const T> q, k, v, out_c, dout;
  simt::gptr<T> out, dq, dk, dv;
  simt::gptr<float> lse, dq_acc, dsum;
  simt::gptr<const int64_t> cu_q, cu_k;
  simt::gptr<const uint8_t> kpm;
  AttnBwdParams s;  // sizes, strides, mask, head map, scale (the forward leaves the backward part empty)
};

template <class T>
AKParams<T> make_akparams(const AttnBwdParams& s) {
  AKParams<T> p;
  p.s = s;
  p.q = simt::make_gptr(static_cast<const T*>(s.q), s.q_span, "q");
  p.k = simt::make_gptr(static_cast<const T*>(s.k), s.k_span, "k");
  p.v = simt::make_gptr(static_cast<const T*>(s.v), s.v_span, "v");
  p.out = simt::make_gptr(static_cast<T*>(s.out), s.o_span, "out");
  p.out_c = simt::make_gptr(static_cast<const T*>(s.out), s.o_span, "out");
  p.dout = simt::make_gptr(static_cast<const T*>(s.dout), s.do_span, "grad_out");
  p.dq = simt::make_gptr(static_cast<T*>(s.dq), s.dq_span, "dq");
  p.dk = simt::make_gptr(static_cast<T*>(s.dk), s.dk_span, "dk");
  p.dv = simt::make_gptr(static_cast<T*>(s.dv), s.dk_span, "dv");
  p.lse = simt::make_gptr(s.lse, s.l_span, "lse");
  p.dq_acc = simt::make_gptr(s.dq_acc, s.dq_span, "dq_accum");
  p.dsum = simt::make_gptr(s.dsum, s.l_span, "dsum");
  p.cu_q = simt::make_gptr(s.cu_q, s.cu_q ? s.batch + 1 : 0, "cu_seqlens_q");
  p.cu_k = simt::make_gptr(s.cu_k, s.cu_k ? s.batch + 1 : 0, "cu_seqlens_k");
  p.kpm = simt::make_gptr(s.kpm, s.kpm_span, "key_padding_mask");
  return p;
}
template <class T>
AKParams<T> make_akparams(const AttnFwdParams& f) {
  AttnBwdParams s;
  static_cast<AttnFwdParams&>(s) = f;
  return make_akparams<T>(s);
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct SeqInfo {
  int64_t q0, k0, nq, nk;  // first packed row of q / k, lengths
};

template <class T>
LT_DEV SeqInfo seq_info(const AKParams<T>& p, int64_t b) {
  if (p.s.cu_q != nullptr) {
    const int64_t q0 = p.cu_q[b], q1 = p.cu_q[b + 1], k0 = p.cu_k[b], k1 = p.cu_k[b + 1];
    return {q0, k0, q1 - q0, k1 - k0};
  }
  return {0, 0, p.s.nq, p.s.nk};
}

// The i-th tile of <= 2 tile ranges.
LT_HD int64_t tile_count(const Ranges& r) {
  return (r.n >= 1 ? r.hi[0] - r.lo[0] : 0) + (r.n >= 2 ? r.hi[1] - r.lo[1] : 0);
}
LT_HD int64_t tile_at(const Ranges& r, int64_t i) {
  const int64_t n0 = r.n > 0 ? r.hi[0] - r.lo[0] : 0;
  return i < n0 ? r.lo[0] + i : r.lo[1] + (i - n0);
}

template <class T>
LT_DEV void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  if constexpr (std::is_same_v<T, simt::bf16>) simt::mma_m16n8k16_bf16(d, a, b, d);
  else simt::mma_m16n8k16_f16(d, a, b, d);
}
template <class T>
LT_DEV uint32_t pack_f2(float lo, float hi) {
  return simt::pack2(simt::from_float<T>(lo).bits, simt::from_float<T>(hi).bits);
}
LT_DEV float fast_exp2(float x) { return ::exp2f(x); }
// NaN or +-inf (all exponent bits set) in a 16-bit float.
template <class T>
LT_DEV bool nonfinite16(T v) {
  constexpr uint16_t e = std::is_same_v<T, simt::bf16> ? 0x7f80u : 0x7c00u;
  return (v.bits & e) == e;
}

// Copies `rows` rows of D elements (row r at src + r * stride) into shared rows of `R` elements with
// 16-byte cp.async (NT threads); rows >= valid are zero-filled instead of read.
template <class T, int D, int R, int NT>
LT_DEV void load_rows(simt::sptr<T> dst, simt::gptr<const T> src, int64_t stride, int rows, int64_t valid) {
  constexpr int C = D / 8;  // 16-byte chunks per row
  for (int idx = static_cast<int>(simt::thread_linear()); idx < rows * C; idx += NT) {
    const int r = idx / C, c = (idx % C) * 8;
    if (r < valid) {
      simt::cp_async_16(dst + (r * R + c), src + (int64_t(r) * stride + c));
    } else {
      T z[8];
  LT_UNROLL for (int t = 0; t < 8; ++t) z[t] = T{0};
      simt::st_vec<8>(dst + (r * R + c), 0, z);
    }
  }
}

// ------------------------------------------------------------------------------------ forward
// Cap: logit softcapping (p.s.softcap > 0) compiled in; the launchers pick the variant, so the
// uncapped kernels carry none of its registers.
template <class T, int D, bool Cap = false>
LT_DEV void attn_fwd_body(const AKParams<T>& p) {
  using Sh = AttnShape<D>;
  constexpr int kBQ = Sh::kFwdBQ, kBK = Sh::kFwdBK, NT = Sh::kFwdThreads;
  constexpr bool q_regs = Sh::kFwdQInRegs;
  constexpr int R = D + 8, KS = D / 16, NB = kBK / 8, DB = D / 8;
  const uint32_t lane = simt::lane_id(), w = simt::warp_id(), g = lane / 4, c4 = lane % 4;
  const int64_t qt = simt::block_idx().x;
  const int32_t e = static_cast<int32_t>(simt::block_idx().y);
  const int64_t b = simt::block_idx().z;
  const SeqInfo sq = seq_info(p, b);
  const int64_t i0 = qt * kBQ;
  if (i0 >= sq.nq) return;  // the whole block (packed sequences shorter than the longest)
  const int32_t qh = p.s.hm.q_head(e), kh = p.s.hm.kv_head(e);
  const SeqMask m = bind(p.s.mask, sq.nq, sq.nk, e);
  const Ranges tiles = tile_ranges<true>(m, i0, imin(i0 + kBQ, sq.nq), kBK);
  const int64_t nt = tile_count(tiles);
  const bool has_kpm = p.s.kpm != nullptr;
  // logit softcapping (Cap): s -> cap * tanh(s * scale / cap), then only the log2e factor of the
  // exp2 softmax
  constexpr bool capped = Cap;
  const float cap = p.s.softcap, cap_in = capped ? p.s.scale / p.s.softcap : 0.f;
  const float sl2 = capped ? kLog2e : p.s.scale * kLog2e;

  simt::sptr<T> sQ = simt::dynamic_smem<T>();
  simt::sptr<T> sK = sQ + kBQ * R;        // 2 buffers of kBK * R
  simt::sptr<T> sV = sK + 2 * kBK * R;    // 2 buffers
  // P of the slow path below: the warp's own rows of sQ when the Q fragments are in registers and
  // a Q row holds kBK elements, else a tile of its own (kBQ x (kBK + 8))
  constexpr int RP = Sh::kFwdPInQ ? R : kBK + 8;
  simt::sptr<T> sP = Sh::kFwdPInQ ? sQ : sV + 2 * kBK * R;

  const simt::gptr<const T> qbase =
      p.q + (b * p.s.q_batch_stride + (sq.q0 + i0) * p.s.q_row_stride + qh * p.s.q_head_stride);
  const simt::gptr<const T> kbase = p.k + (b * p.s.k_batch_stride + sq.k0 * p.s.k_row_stride + kh * p.s.k_head_stride);
  const simt::gptr<const T> vbase = p.v + (b * p.s.v_batch_stride + sq.k0 * p.s.v_row_stride + kh * p.s.v_head_stride);
  auto load_kv = [&](int64_t kt, int buf) {
    const int64_t j0 = kt * kBK;
    load_rows<T, D, R, NT>(sK + buf * kBK * R, kbase + j0 * p.s.k_row_stride, p.s.k_row_stride, kBK, sq.nk - j0);
    load_rows<T, D, R, NT>(sV + buf * kBK * R, vbase + j0 * p.s.v_row_stride, p.s.v_row_stride, kBK, sq.nk - j0);
  };

  // this thread's rows: w*16 + g and + 8
  int64_t qi[2];
  Ranges rr[2];
  LT_UNROLL for (int r = 0; r < 2; ++r) {
    qi[r] = i0 + w * 16 + g + 8 * r;
    if constexpr (!Sh::kFwdRangesPerTile) rr[r] = m.row_ranges(qi[r]);  // empty past nq
  }
  float o[DB][4];
  LT_UNROLL for (int db = 0; db < DB; ++db)
    LT_UNROLL for (int t = 0; t < 4; ++t) o[db][t] = 0.f;
  float mx[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  if (nt > 0) {
    load_rows<T, D, R, NT>(sQ, qbase, p.s.q_row_stride, kBQ, sq.nq - i0);
    load_kv(tile_at(tiles, 0), 0);
    simt::cp_async_commit();
  }
  uint32_t qf[q_regs ? KS : 1][4];
  for (int64_t it = 0; it < nt; ++it) {
    const int buf = static_cast<int>(it & 1);
    const int64_t kt = tile_at(tiles, it), j0 = kt * kBK;
    if (it + 1 < nt) {
      load_kv(tile_at(tiles, it + 1), buf ^ 1);
      simt::cp_async_commit();
      simt::cp_async_wait<1>();
    } else {
      simt::cp_async_wait<0>();
    }
    simt::sync_block();
    if (q_regs && it == 0) {
      LT_UNROLL for (int ks = 0; ks < (q_regs ? KS : 0); ++ks)
        simt::ldmatrix_x4(qf[ks], sQ + ((w * 16 + lane % 16) * R + ks * 16 + (lane / 16) * 8));
    }
    const simt::sptr<T> kb = sK + buf * kBK * R, vb = sV + buf * kBK * R;
    // S = Q K^T (16 x kBK per warp)
    float s[NB][4];
    LT_UNROLL for (int nb = 0; nb < NB; ++nb)
      LT_UNROLL for (int t = 0; t < 4; ++t) s[nb][t] = 0.f;
    LT_UNROLL for (int ks = 0; ks < KS; ++ks) {
      const int kq = q_regs ? ks : 0;
      if constexpr (!q_regs)
        simt::ldmatrix_x4(qf[0], sQ + ((w * 16 + lane % 16) * R + ks * 16 + (lane / 16) * 8));
      LT_UNROLL for (int nb2 = 0; nb2 < NB / 2; ++nb2) {
        uint32_t bb[4];
        simt::ldmatrix_x4(bb, kb + ((nb2 * 16 + (lane / 16) * 8 + lane % 8) * R + ks * 16 + ((lane / 8) % 2) * 8));
        mma<T>(s[2 * nb2], qf[kq], bb[0], bb[1]);
        mma<T>(s[2 * nb2 + 1], qf[kq], bb[2], bb[3]);
      }
    }
    if constexpr (capped) {
      LT_UNROLL for (int nb = 0; nb < NB; ++nb)
        LT_UNROLL for (int t = 0; t < 4; ++t) s[nb][t] = cap * ::tanhf(s[nb][t] * cap_in);
    }
    // mask, online softmax (a visible NaN score makes the running max NaN, and with it the row's
    // output and lse; +inf gives inf - inf = NaN as in torch.softmax)
    bool partial = false;  // some row of this warp does not see some key of the tile
    bool kpm_tile = true;  // no padded key in the tile
    if (has_kpm) {
      static_assert(kBK == 32 || kBK == 64, "key tile: one or two keys per lane");
      const int64_t ja = j0 + lane, jb = j0 + lane + 32;
      const bool keep = (ja >= sq.nk || p.kpm[b * p.s.nk + ja] != 0) &&
                        (kBK < 64 || jb >= sq.nk || p.kpm[b * p.s.nk + jb] != 0);
      kpm_tile = simt::all(simt::kFullMask, keep);
    }
    if constexpr (Sh::kFwdRangesPerTile) {
      LT_UNROLL for (int r = 0; r < 2; ++r) rr[r] = m.row_ranges(qi[r]);
    }
    LT_UNROLL for (int r = 0; r < 2; ++r) {
      const bool covers = row_covers(rr[r], j0, j0 + kBK);
      const bool full = !has_kpm && covers;
      partial = partial || (qi[r] < sq.nq && !(covers && kpm_tile));
      float tmax = -INFINITY;
      LT_UNROLL for (int nb = 0; nb < NB; ++nb) {
        LT_UNROLL for (int cc = 0; cc < 2; ++cc) {
          float x = s[nb][2 * r + cc] * sl2;
          if (!full) {
            const int64_t j = j0 + nb * 8 + 2 * c4 + cc;
            const bool vis = in_ranges(rr[r], j) && (!has_kpm || p.kpm[b * p.s.nk + j] != 0);
            if (!vis) x = -INFINITY;
          }
          s[nb][2 * r + cc] = x;
          tmax = nan_max(x, tmax);
        }
      }
      tmax = nan_max(tmax, simt::shfl_xor(simt::kFullMask, tmax, 1));
      tmax = nan_max(tmax, simt::shfl_xor(simt::kFullMask, tmax, 2));
      const float mnew = nan_max(mx[r], tmax);
      const float base = mnew == -INFINITY ? 0.f : mnew;
      const float alpha = fast_exp2(mx[r] - base);
      mx[r] = mnew;
      float sum = 0.f;
      LT_UNROLL for (int nb = 0; nb < NB; ++nb) {
        LT_UNROLL for (int cc = 0; cc < 2; ++cc) {
          const float pv = fast_exp2(s[nb][2 * r + cc] - base);
          s[nb][2 * r + cc] = pv;
          sum += pv;
        }
      }
      l[r] = l[r] * alpha + sum;
      LT_UNROLL for (int db = 0; db < DB; ++db) {
        o[db][2 * r] *= alpha;
        o[db][2 * r + 1] *= alpha;
      }
    }
    // O += P V. In a tile that some row of the warp sees only in part, a masked key's P = 0 would
    // still be multiplied by its V row; when that row holds a NaN / inf (checked only in such
    // tiles), the warp takes the slow path: the product over each row's visible keys only.
    bool slow = false;
    if (simt::any(simt::kFullMask, partial)) {
      bool bad = false;
      for (int idx = static_cast<int>(lane); idx < kBK * DB; idx += 32) {
        T vv[8];
        simt::ld_vec<8>(vb, (idx / DB) * R + (idx % DB) * 8, vv);
        LT_UNROLL for (int t = 0; t < 8; ++t) bad = bad || nonfinite16(vv[t]);
      }
      slow = simt::any(simt::kFullMask, bad);
    }
    if (slow) {
      // this warp's P (rounded as the MMA reads it) into its own rows of sP (sQ's rows are free
      // once the Q fragments are in registers)
      simt::sync_warp(simt::kFullMask);
      LT_UNROLL for (int r = 0; r < 2; ++r) {
        LT_UNROLL for (int nb = 0; nb < NB; ++nb) {
          const T pair[2] = {simt::from_float<T>(s[nb][2 * r]), simt::from_float<T>(s[nb][2 * r + 1])};
          simt::st_vec<2>(sP, (w * 16 + g + 8 * r) * RP + nb * 8 + 2 * c4, pair);
        }
      }
      simt::sync_warp(simt::kFullMask);
      LT_UNROLL for (int r = 0; r < 2; ++r) {
        for (int jl = 0; jl < kBK; ++jl) {
          const int64_t j = j0 + jl;
          if (!(in_ranges(rr[r], j) && (!has_kpm || p.kpm[b * p.s.nk + j] != 0))) continue;
          const float pj = simt::to_float(static_cast<T>(sP[(w * 16 + g + 8 * r) * RP + jl]));
          LT_UNROLL for (int db = 0; db < DB; ++db) {
            LT_UNROLL for (int cc = 0; cc < 2; ++cc)
              o[db][2 * r + cc] += pj * simt::to_float(static_cast<T>(vb[jl * R + db * 8 + 2 * c4 + cc]));
          }
        }
      }
    } else {
      LT_UNROLL for (int ks = 0; ks < kBK / 16; ++ks) {
        const uint32_t a[4] = {pack_f2<T>(s[2 * ks][0], s[2 * ks][1]), pack_f2<T>(s[2 * ks][2], s[2 * ks][3]),
                               pack_f2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                               pack_f2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3])};
        LT_UNROLL for (int db2 = 0; db2 < DB / 2; ++db2) {
          uint32_t bb[4];
          simt::ldmatrix_x4<true>(bb, vb + ((ks * 16 + ((lane / 8) % 2) * 8 + lane % 8) * R + db2 * 16 + (lane / 16) * 8));
          mma<T>(o[2 * db2], a, bb[0], bb[1]);
          mma<T>(o[2 * db2 + 1], a, bb[2], bb[3]);
        }
      }
    }
    simt::sync_block();  // the next iteration's loads overwrite this buffer
  }
  // normalise and store
  LT_UNROLL for (int r = 0; r < 2; ++r) {
    float lt = l[r];
    lt += simt::shfl_xor(simt::kFullMask, lt, 1);
    lt += simt::shfl_xor(simt::kFullMask, lt, 2);
    if (qi[r] >= sq.nq) continue;
    const bool empty = lt == 0.f;  // no visible key: output 0, lse -inf (a NaN row has lt NaN)
    const float inv = empty ? 0.f : 1.f / lt;
    const int64_t row = sq.q0 + qi[r];
    const simt::gptr<T> orow =
        p.out + (b * p.s.o_batch_stride + row * p.s.o_row_stride + int64_t(e) * p.s.o_head_stride);
    LT_UNROLL for (int db = 0; db < DB; ++db) {
      const T pair[2] = {simt::from_float<T>(o[db][2 * r] * inv), simt::from_float<T>(o[db][2 * r + 1] * inv)};
      simt::st_vec<2>(orow, db * 8 + 2 * c4, pair);
    }
    if (c4 == 0) {
      p.lse[b * p.s.lse_batch_stride + int64_t(e) * p.s.lse_head_stride + row] =
          empty ? -INFINITY : mx[r] * kLn2 + ::logf(lt);
    }
  }
}

// ------------------------------------------------------------------------------------ backward
// Dsum[e, row] = sum_d dO * O (fp32), one thread per (row, output head).
template <class T, int D>
LT_DEV void attn_dsum_body(const AKParams<T>& p) {
  const int64_t idx = int64_t(simt::block_idx().x) * kThreads + simt::thread_linear();
  const int64_t H = p.s.hm.heads;
  const int64_t rows_per_b = p.s.cu_q != nullptr ? p.s.total_q : p.s.nq;
  if (idx >= p.s.total_q * H) return;
  const int64_t t = idx / H, e = idx % H, b = t / rows_per_b, i = t % rows_per_b;
  const simt::gptr<const T> o = p.out_c + (b * p.s.o_batch_stride + i * p.s.o_row_stride + e * p.s.o_head_stride);
  const simt::gptr<const T> go = p.dout + (b * p.s.do_batch_stride + i * p.s.do_row_stride + e * p.s.do_head_stride);
  float acc = 0.f;
  LT_UNROLL for (int d0 = 0; d0 < D; d0 += 8) {
    T ov[8], gv[8];
    simt::ld_vec<8>(o, d0, ov);
    simt::ld_vec<8>(go, d0, gv);
    LT_UNROLL for (int t2 = 0; t2 < 8; ++t2) acc += simt::to_float(ov[t2]) * simt::to_float(gv[t2]);
  }
  p.dsum[b * p.s.lse_batch_stride + e * p.s.lse_head_stride + i] = acc;
}

// dq = dq_acc * scale in dq's dtype (both contiguous, total_q * hq * D elements).
template <class T, int D>
LT_DEV void attn_dq_convert_body(const AKParams<T>& p) {
  const int64_t n = p.s.total_q * p.s.hm.hq * D / 8;
  const int64_t idx = int64_t(simt::block_idx().x) * kThreads + simt::thread_linear();
  if (idx >= n) return;
  float a[8];
  simt::ld_vec<8>(p.dq_acc, idx * 8, a);
  T r[8];
  LT_UNROLL for (int t = 0; t < 8; ++t) r[t] = simt::from_float<T>(a[t] * p.s.scale);
  simt::st_vec<8>(p.dq, idx * 8, r);
}

template <class T, int D, bool Cap = false>
LT_DEV void attn_bwd_body(const AKParams<T>& p) {
  using Sh = AttnShape<D>;
  constexpr int kBQ = Sh::kBwdBQ, kBK = Sh::kBwdBK, NT = Sh::kBwdThreads;
  constexpr int R = D + 8, RS = kBQ + 8, DB = D / 8, KS = D / 16;
  // warp w = (row group wr, part wc): S^T and dP^T of key rows wr*16 .. wr*16+15 and query columns
  // wc*QS .. wc*QS+QS-1 of the tile (NBW blocks of 8), dK / dV of the same key rows and columns of
  // part wc (DBW blocks of 8). With CS > 1 the row group's warps exchange P^T and dS^T through
  // shared memory (kBwdPInSmem), so no S^T / dP^T element is computed twice.
  constexpr int RW = Sh::kBwdRowWarps, CS = Sh::kBwdColSplit, NW = NT / 32, DBW = DB / CS;
  constexpr int QS = kBQ / CS, NBW = QS / 8;
  constexpr bool p_smem = Sh::kBwdPInSmem;
  const uint32_t lane = simt::lane_id(), w = simt::warp_id(), g = lane / 4, c4 = lane % 4;
  const uint32_t wr = CS == 1 ? w : w % RW, wc = CS == 1 ? 0 : w / RW;
  const uint32_t tid = simt::thread_linear();
  const int64_t kt = simt::block_idx().x;
  const int32_t h = static_cast<int32_t>(simt::block_idx().y);  // kv head
  const int64_t b = simt::block_idx().z;
  const SeqInfo sq = seq_info(p, b);
  const int64_t j0 = kt * kBK;
  if (j0 >= sq.nk) return;
  const HeadMap hm = p.s.hm;
  // output heads reading kv head h: GQA/MQA/MHA: h*r .. h*r + r - 1; rSQA: h alone
  const int32_t nmem = hm.hq >= hm.hkv ? hm.hq / hm.hkv : 1;
  const int32_t e_first = hm.hq >= hm.hkv ? h * nmem : h;
  const bool has_kpm = p.s.kpm != nullptr;
  // logit softcapping: P from cap * tanh(s * scale / cap), dS through the tanh (factor 1 - tanh^2;
  // the final dK / dQ scaling by softmax_scale stays); compiled in only with Cap
  constexpr bool capped = Cap;
  const float cap = p.s.softcap, cap_in = capped ? p.s.scale / p.s.softcap : 0.f;
  const float sl2 = capped ? kLog2e : p.s.scale * kLog2e;

  simt::sptr<T> sK = simt::dynamic_smem<T>();
  simt::sptr<T> sV = sK + kBK * R;
  simt::sptr<T> sQb = sV + kBK * R;       // 2 buffers of kBQ * R
  simt::sptr<T> sOb = sQb + 2 * kBQ * R;  // dO tiles, 2 buffers
  simt::sptr<T> sS = sOb + 2 * kBQ * R;   // dS^T: kBK x RS
  simt::sptr<T> sP = sS + kBK * RS;       // P^T: kBK x RS (only with p_smem)
  simt::sptr<float> sLb =
      simt::sptr<float>(reinterpret_cast<float*>(simt::raw(sP + (p_smem ? kBK * RS : 0))));  // 2 x kBQ
  simt::sptr<float> sDb = sLb + 2 * kBQ;                                                          // 2 x kBQ

  load_rows<T, D, R, NT>(sK, p.k + (b * p.s.k_batch_stride + (sq.k0 + j0) * p.s.k_row_stride + h * p.s.k_head_stride),
                         p.s.k_row_stride, kBK, sq.nk - j0);
  load_rows<T, D, R, NT>(sV, p.v + (b * p.s.v_batch_stride + (sq.k0 + j0) * p.s.v_row_stride + h * p.s.v_head_stride),
                         p.s.v_row_stride, kBK, sq.nk - j0);
  simt::cp_async_commit();

  // this thread's key rows (of S^T): wr*16 + g and + 8
  int64_t kj[2];
  bool kvalid[2];
  LT_UNROLL for (int r = 0; r < 2; ++r) {
    kj[r] = j0 + wr * 16 + g + 8 * r;
    kvalid[r] = kj[r] < sq.nk && (!has_kpm || p.kpm[b * p.s.nk + kj[r]] != 0);
  }
  float dk[DBW][4], dv[DBW][4];
  LT_UNROLL for (int db = 0; db < DBW; ++db)
    LT_UNROLL for (int t = 0; t < 4; ++t) dk[db][t] = dv[db][t] = 0.f;

  // The work list: (member head, query tile) pairs, members in order, each member's tiles from
  // tile_ranges<false>; a cursor walks it so the next pair's Q / dO / lse / Dsum tiles are
  // prefetched (cp.async, second buffer) while the current one is computed.
  struct Cursor {
    int32_t mem;
    int64_t it, nt;
    Ranges tiles;
  };
  auto advance = [&](Cursor& cur) {
    ++cur.it;
    while (cur.it >= cur.nt && ++cur.mem < nmem) {
      const SeqMask mm = bind(p.s.mask, sq.nq, sq.nk, e_first + cur.mem);
      cur.tiles = tile_ranges<false>(mm, j0, imin(j0 + kBK, sq.nk), kBQ);
      cur.nt = tile_count(cur.tiles);
      cur.it = 0;
    }
  };
  auto prefetch = [&](const Cursor& cur, int buf) {
    const int32_t e = e_first + cur.mem, qh = hm.q_head(e);
    const int64_t i0 = tile_at(cur.tiles, cur.it) * kBQ;
    load_rows<T, D, R, NT>(sQb + buf * kBQ * R,
                           p.q + (b * p.s.q_batch_stride + (sq.q0 + i0) * p.s.q_row_stride + qh * p.s.q_head_stride),
                           p.s.q_row_stride, kBQ, sq.nq - i0);
    load_rows<T, D, R, NT>(sOb + buf * kBQ * R,
                           p.dout + (b * p.s.do_batch_stride + (sq.q0 + i0) * p.s.do_row_stride +
                                     int64_t(e) * p.s.do_head_stride),
                           p.s.do_row_stride, kBQ, sq.nq - i0);
    simt::cp_async_commit();
    static_assert(NT >= kBQ, "one lse / Dsum entry per thread");
    if (tid < kBQ) {
      const int64_t i = i0 + tid, l = b * p.s.lse_batch_stride + int64_t(e) * p.s.lse_head_stride + sq.q0 + i;
      sLb[buf * kBQ + tid] = i < sq.nq ? p.lse[l] : 0.f;
      sDb[buf * kBQ + tid] = i < sq.nq ? p.dsum[l] : 0.f;
    }
  };
  Cursor cur{-1, 0, 0, Ranges{}};
  advance(cur);  // first (member, tile) with work, or mem == nmem
  if (cur.mem < nmem) prefetch(cur, 0);
  for (int buf = 0; cur.mem < nmem; buf ^= 1) {
    Cursor nxt = cur;
    advance(nxt);
    if (nxt.mem < nmem) {
      prefetch(nxt, buf ^ 1);
      simt::cp_async_wait<1>();
    } else {
      simt::cp_async_wait<0>();
    }
    simt::sync_block();
    const int32_t e = e_first + cur.mem, qh = hm.q_head(e);
    const int64_t i0 = tile_at(cur.tiles, cur.it) * kBQ;
    const SeqMask m = bind(p.s.mask, sq.nq, sq.nk, e);
    Ranges cr[2];
    LT_UNROLL for (int r = 0; r < 2; ++r) cr[r] = m.col_ranges(kj[r]);  // empty past nk
    const simt::sptr<T> sQ = sQb + buf * kBQ * R, sO = sOb + buf * kBQ * R;
    const simt::sptr<float> sL = sLb + buf * kBQ, sD = sDb + buf * kBQ;
    {
      // S^T = K Q^T and dP^T = V dO^T (16 keys x QS queries per warp)
      float st[NBW][4], dp[NBW][4];
      LT_UNROLL for (int nb = 0; nb < NBW; ++nb)
        LT_UNROLL for (int t = 0; t < 4; ++t) st[nb][t] = dp[nb][t] = 0.f;
      LT_UNROLL for (int ks = 0; ks < KS; ++ks) {
        uint32_t ka[4], va[4];
        simt::ldmatrix_x4(ka, sK + ((wr * 16 + lane % 16) * R + ks * 16 + (lane / 16) * 8));
        simt::ldmatrix_x4(va, sV + ((wr * 16 + lane % 16) * R + ks * 16 + (lane / 16) * 8));
        LT_UNROLL for (int nb2 = 0; nb2 < NBW / 2; ++nb2) {
          const int off = (wc * QS + nb2 * 16 + (lane / 16) * 8 + lane % 8) * R + ks * 16 + ((lane / 8) % 2) * 8;
          uint32_t bb[4];
          simt::ldmatrix_x4(bb, sQ + off);
          mma<T>(st[2 * nb2], ka, bb[0], bb[1]);
          mma<T>(st[2 * nb2 + 1], ka, bb[2], bb[3]);
          simt::ldmatrix_x4(bb, sO + off);
          mma<T>(dp[2 * nb2], va, bb[0], bb[1]);
          mma<T>(dp[2 * nb2 + 1], va, bb[2], bb[3]);
        }
      }
      // P^T (masked) and dS^T = P^T o (dP^T - Dsum); dS^T also to shared memory for dQ (and P^T
      // with p_smem, for the dV / dK products of the row group's warps)
      LT_UNROLL for (int r = 0; r < 2; ++r) {
        const bool full = row_covers(cr[r], i0, i0 + kBQ);
        LT_UNROLL for (int nb = 0; nb < NBW; ++nb) {
          LT_UNROLL for (int cc = 0; cc < 2; ++cc) {
            const int ql = static_cast<int>(wc) * QS + nb * 8 + 2 * c4 + cc;
            const float L = sL[ql];
            const bool vis = kvalid[r] && (full || in_ranges(cr[r], i0 + ql)) && L != -INFINITY;
            float x = st[nb][2 * r + cc], f = 1.f;
            if constexpr (capped) {
              const float th = ::tanhf(x * cap_in);
              x = cap * th;
              f = 1.f - th * th;
            }
            const float pv = vis ? fast_exp2(x * sl2 - L * kLog2e) : 0.f;  // NaN lse: NaN
            st[nb][2 * r + cc] = pv;
            dp[nb][2 * r + cc] = vis ? pv * (dp[nb][2 * r + cc] - sD[ql]) * f : 0.f;  // masked: 0 even if Dsum is NaN
          }
          const int at = (wr * 16 + g + 8 * r) * RS + static_cast<int>(wc) * QS + nb * 8 + 2 * c4;
          const T pair[2] = {simt::from_float<T>(dp[nb][2 * r]), simt::from_float<T>(dp[nb][2 * r + 1])};
          simt::st_vec<2>(sS, at, pair);
          if constexpr (p_smem) {
            const T pp[2] = {simt::from_float<T>(st[nb][2 * r]), simt::from_float<T>(st[nb][2 * r + 1])};
            simt::st_vec<2>(sP, at, pp);
          }
        }
      }
      if constexpr (p_smem) simt::sync_block();  // P^T, dS^T of all query columns
      // dV += P^T dO, dK += dS^T Q (this warp's columns; with p_smem the A fragments of all kBQ
      // query columns come from shared memory, else from this warp's registers)
      LT_UNROLL for (int ks = 0; ks < kBQ / 16; ++ks) {
        uint32_t pa[4], da[4];
        if constexpr (p_smem) {
          const int at = (wr * 16 + lane % 16) * RS + ks * 16 + (lane / 16) * 8;
          simt::ldmatrix_x4(pa, sP + at);
          simt::ldmatrix_x4(da, sS + at);
        } else {
          pa[0] = pack_f2<T>(st[2 * ks][0], st[2 * ks][1]);
          pa[1] = pack_f2<T>(st[2 * ks][2], st[2 * ks][3]);
          pa[2] = pack_f2<T>(st[2 * ks + 1][0], st[2 * ks + 1][1]);
          pa[3] = pack_f2<T>(st[2 * ks + 1][2], st[2 * ks + 1][3]);
          da[0] = pack_f2<T>(dp[2 * ks][0], dp[2 * ks][1]);
          da[1] = pack_f2<T>(dp[2 * ks][2], dp[2 * ks][3]);
          da[2] = pack_f2<T>(dp[2 * ks + 1][0], dp[2 * ks + 1][1]);
          da[3] = pack_f2<T>(dp[2 * ks + 1][2], dp[2 * ks + 1][3]);
        }
        LT_UNROLL for (int db2 = 0; db2 < DBW / 2; ++db2) {
          const int off = (ks * 16 + ((lane / 8) % 2) * 8 + lane % 8) * R + (wc * DBW + 2 * db2) * 8 + (lane / 16) * 8;
          uint32_t bb[4];
          simt::ldmatrix_x4<true>(bb, sO + off);
          mma<T>(dv[2 * db2], pa, bb[0], bb[1]);
          mma<T>(dv[2 * db2 + 1], pa, bb[2], bb[3]);
          simt::ldmatrix_x4<true>(bb, sQ + off);
          mma<T>(dk[2 * db2], da, bb[0], bb[1]);
          mma<T>(dk[2 * db2 + 1], da, bb[2], bb[3]);
        }
        if constexpr (DBW % 2 == 1) {  // the last 8 columns of an odd count
          const int off = (ks * 16 + ((lane / 8) % 2) * 8 + lane % 8) * R + (wc * DBW + DBW - 1) * 8;
          uint32_t bb[2];
          simt::ldmatrix_x2<true>(bb, sO + off);
          mma<T>(dv[DBW - 1], pa, bb[0], bb[1]);
          simt::ldmatrix_x2<true>(bb, sQ + off);
          mma<T>(dk[DBW - 1], da, bb[0], bb[1]);
        }
      }
      if constexpr (!p_smem) simt::sync_block();  // dS^T complete
      // dQ (query rows qg*16 .. qg*16+15 of the tile) = dS K, 16 columns at a time (the dS
      // fragments stay in registers; each chunk goes straight to dq_acc). QG row groups over NW
      // warps: with NW >= QG each row group's columns are split across NW / QG warps.
      constexpr int QG = kBQ / 16, QW = NW >= QG ? NW / QG : 1, QN = NW >= QG ? 1 : (QG + NW - 1) / NW;
      constexpr int NC = (DB / 2 + QW - 1) / QW;  // column chunks per warp
      static_assert(NW < QG || NW % QG == 0, "dQ: warps per query row group");
      LT_UNROLL for (int qn = 0; qn < QN; ++qn) {
        const uint32_t qg = NW == QG ? w : NW > QG ? w % QG : w + qn * NW;
        if (NW < QG && qg >= QG) continue;
        uint32_t sa[kBK / 16][4];
        LT_UNROLL for (int ks = 0; ks < kBK / 16; ++ks) {
          const uint32_t mi = lane / 8;
          simt::ldmatrix_x4<true>(sa[ks], sS + ((ks * 16 + (mi / 2) * 8 + lane % 8) * RS + qg * 16 + (mi % 2) * 8));
        }
        const int64_t iq0 = i0 + qg * 16 + g;
        const simt::gptr<float> drow =
            p.dq_acc + (b * p.s.dq_batch_stride + (sq.q0 + iq0) * p.s.dq_row_stride + qh * p.s.dq_head_stride);
        LT_UNROLL for (int nc = 0; nc < NC; ++nc) {
          const int db2 = QW == 1 ? nc : nc * QW + static_cast<int>(w / QG);
          if (QW > 1 && db2 >= DB / 2) continue;
          float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
          LT_UNROLL for (int ks = 0; ks < kBK / 16; ++ks) {
            uint32_t bb[4];
            simt::ldmatrix_x4<true>(bb, sK + ((ks * 16 + ((lane / 8) % 2) * 8 + lane % 8) * R + db2 * 16 + (lane / 16) * 8));
            mma<T>(acc[0], sa[ks], bb[0], bb[1]);
            mma<T>(acc[1], sa[ks], bb[2], bb[3]);
          }
          LT_UNROLL for (int r = 0; r < 2; ++r) {
            if (iq0 + 8 * r >= sq.nq) continue;
            LT_UNROLL for (int h2 = 0; h2 < 2; ++h2) {
              const int64_t col = 8 * r * p.s.dq_row_stride + db2 * 16 + h2 * 8 + 2 * c4;
              simt::atomic_add(drow + col, acc[h2][2 * r]);
              simt::atomic_add(drow + (col + 1), acc[h2][2 * r + 1]);
            }
          }
        }
      }
      // The next iteration's prefetch overwrites this buffer, which dV / dK above read from shared
      // memory after the P^T / dS^T exchange. Without the exchange (!p_smem) the "dS^T complete"
      // barrier already follows the last read of the buffer, and sS is next written after the next
      // iteration's first barrier: no barrier is needed here.
      if constexpr (p_smem) simt::sync_block();
    }
    cur = nxt;
  }
  simt::cp_async_wait<0>();  // (no tile at all: the K/V copies are still pending)
  LT_UNROLL for (int r = 0; r < 2; ++r) {
    if (kj[r] >= sq.nk) continue;
    const int64_t row = (b * p.s.dk_batch_stride + (sq.k0 + kj[r]) * p.s.dk_row_stride + h * p.s.dk_head_stride);
    LT_UNROLL for (int db = 0; db < DBW; ++db) {
      const T kp[2] = {simt::from_float<T>(dk[db][2 * r] * p.s.scale), simt::from_float<T>(dk[db][2 * r + 1] * p.s.scale)};
      const T vp[2] = {simt::from_float<T>(dv[db][2 * r]), simt::from_float<T>(dv[db][2 * r + 1])};
      simt::st_vec<2>(p.dk, row + (wc * DBW + db) * 8 + 2 * c4, kp);
      simt::st_vec<2>(p.dv, row + (wc * DBW + db) * 8 + 2 * c4, vp);
    }
  }
}

// Calls f.template operator()<T, D>() for the params' dtype and head dim; a head dim outside
// LT_ATTN_HEAD_DIMS (refused by the host checks before) throws std::invalid_argument naming it.
template <class F>
void attn_dispatch(const AttnFwdParams& s, F&& f) {
  auto by_d = [&]<class T>() {
    const bool ok = attn_head_dim_switch(s.d, [&]<int D>() { f.template operator()<T, D>(); });
    if (!ok)
      throw std::invalid_argument("unsupported head_dim " + std::to_string(s.d) + " (supported: " +
                                  attn_head_dims_str() + ")");
  };
  if (s.dtype == DType::BF16) by_d.template operator()<simt::bf16>();
  else by_d.template operator()<simt::f16>();
}

}  // namespace lt::attn
