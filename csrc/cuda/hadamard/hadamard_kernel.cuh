// Device code of the fast Walsh-Hadamard transform, written on the intrinsics layer so the same
// source runs on a GPU (hadamard_launch.cu) and on the CPU emulator (hadamard_emu.cpp).
//
// A row of n = m * P elements (P = 2^log2p) is split in chunks of E contiguous elements (E = 8, or
// P when P < 8); a thread owns one chunk at a time:
//   1. 128-bit vector load, convert to fp32;
//   2. butterflies over the E elements in registers (index bits 0..log2 E);
//   3. warp shuffles (xor) for the next index bits, up to 5 of them (lanes hold consecutive chunks);
//   "warp mode" (m == 1 and P <= 32 E): done - scale, convert, vector store. A warp holds 32E/P rows.
//   "block mode" otherwise: park the chunk in shared memory (fp32), then
//   4. the remaining index bits (strides 32E .. P/2) in radix-2..16 passes through shared memory;
//   5. for m > 1 the m x m factor mix y[c, d] = sum_a +-z[a, d] (signs from a bitmask table);
//   6. scale, convert, vector store. One pass over global memory; all index math is 64-bit.
#pragma once
#include <algorithm>

#include "common/simt/simt.h"
#include "cuda/common/dtype.h"
#include "cuda/common/launch.h"
#include "cuda/hadamard/hadamard_params.h"

namespace lt::hadamard {

template <class T>
struct KParams {
  simt::gptr<const T> x;
  simt::gptr<T> y;
  simt::gptr<const uint32_t> hbits;
  int64_t rows, n, x_row_stride;
  int32_t m, log2p, hwords;
  float scale;
  bool vec_ok;
  bool block_mode;
};

constexpr int kBlockThreads = 256;   // block mode
constexpr int kWarpModeThreads = 128;  // warp mode

template <int E>
LT_DEV void butterflies_in_registers(float (&v)[E]) {
  LT_UNROLL for (int h = 1; h < E; h *= 2) {
    LT_UNROLL for (int i = 0; i < E; ++i) {
      if (!(i & h)) {
        const float a = v[i], b = v[i + h];
        v[i] = a + b;
        v[i + h] = a - b;
      }
    }
  }
}

// Butterfly levels over lanes: partner = lane ^ off, for off < limit (limit <= 32, power of two).
template <int E>
LT_DEV void butterflies_across_lanes(float (&v)[E], uint32_t lane, int64_t limit) {
  for (int off = 1; off < 32 && off < limit; off *= 2) {
    LT_UNROLL for (int i = 0; i < E; ++i) {
      const float o = simt::shfl_xor(simt::kFullMask, v[i], off);
      v[i] = (lane & uint32_t(off)) ? o - v[i] : v[i] + o;
    }
  }
}

// E contiguous elements from global memory into fp32 registers (one vector load when aligned).
template <int E, class T>
LT_DEV void load_elems(simt::gptr<const T> x, int64_t offset, bool vec_ok, float (&v)[E]) {
  T raw[E];
  if (vec_ok) {
    simt::ld_vec<E>(x, offset, raw);
  } else {
    LT_UNROLL for (int i = 0; i < E; ++i) raw[i] = x[offset + i];
  }
  LT_UNROLL for (int i = 0; i < E; ++i) v[i] = simt::to_float(raw[i]);
}

// E fp32 values (times `scale`) converted and stored (one vector store when aligned).
template <int E, class T>
LT_DEV void store_elems(simt::gptr<T> y, int64_t offset, bool vec_ok, const float (&v)[E], float scale) {
  T raw[E];
  LT_UNROLL for (int i = 0; i < E; ++i) raw[i] = simt::from_float<T>(v[i] * scale);
  if (vec_ok) {
    simt::st_vec<E>(y, offset, raw);
  } else {
    LT_UNROLL for (int i = 0; i < E; ++i) y[offset + i] = raw[i];
  }
}

template <class T, int E>
LT_DEV void load_chunk(const KParams<T>& p, int64_t offset, float (&v)[E]) {
  load_elems<E>(p.x, offset, p.vec_ok, v);
}

template <class T, int E>
LT_DEV void store_chunk(const KParams<T>& p, int64_t offset, const float (&v)[E]) {
  store_elems<E>(p.y, offset, p.vec_ok, v, p.scale);
}

// m == 1, P <= 32 E: each warp transforms 32 E / P rows entirely in registers.
template <class T, int E>
LT_DEV void warp_mode(const KParams<T>& p) {
  const int64_t chunks = p.n / E;  // per row, a power of two <= 32
  const uint32_t lane = simt::lane_id();
  const int64_t rows_per_warp = 32 / chunks;
  const int64_t warps_per_block = simt::block_dim().x / 32;
  const int64_t row_in_warp = lane / chunks, chunk = lane % chunks;
  const int64_t first = (int64_t(simt::block_idx().x) * warps_per_block + simt::warp_id()) * rows_per_warp;
  const int64_t step = int64_t(simt::grid_dim().x) * warps_per_block * rows_per_warp;
  // every lane runs the same number of iterations so that the full-mask shuffles always meet
  // row0 depends on the warp only, so the loop (and its full-mask shuffles) is warp-uniform
  for (int64_t row0 = first; row0 < p.rows; row0 += step) {
    const int64_t row = row0 + row_in_warp;
    const bool valid = row < p.rows;
    float v[E];
    if (valid) load_chunk<T, E>(p, row * p.x_row_stride + chunk * E, v);
    else { LT_UNROLL for (int i = 0; i < E; ++i) v[i] = 0.f; }
    butterflies_in_registers<E>(v);
    butterflies_across_lanes<E>(v, lane, chunks);
    if (valid) store_chunk<T, E>(p, row * p.n + chunk * E, v);
  }
}

// Radix-2^R pass over shared memory: index bits [log2 h, log2 h + R) of every segment of P.
template <int R>
LT_DEV void smem_pass(simt::sptr<float> z, int64_t n, int64_t P, int64_t h) {
  constexpr int K = 1 << R;
  const int64_t groups = n >> R;
  for (int64_t g = simt::thread_linear(); g < groups; g += simt::block_dim().x) {
    const int64_t low = g % h, rest = g / h;
    const int64_t spans = P / (h * K);  // groups of K*h elements per segment
    const int64_t base = (rest / spans) * P + (rest % spans) * h * K + low;
    float v[K];
    LT_UNROLL for (int k = 0; k < K; ++k) v[k] = z[base + k * h];
    butterflies_in_registers<K>(v);
    LT_UNROLL for (int k = 0; k < K; ++k) z[base + k * h] = v[k];
  }
}

// The m x m factor mix for E consecutive outputs of one factor row c:
// y[c, d0 + i] = sum_a +-z[base + a P + d0 + i], each as 4 interleaved partial sums combined pairwise
// (a sequential m-term fp32 sum loses about 4x more accuracy than PyTorch's matmul at m = 148..172).
// Each 32-bit sign word is read from global memory once per 32 terms for all E outputs (not once
// per term and output). m is a multiple of 4.
template <int E>
LT_DEV void mix_chunk(simt::sptr<float> z, simt::gptr<const uint32_t> hbits, int32_t m, int32_t hwords, int64_t P,
                      int64_t base, int64_t c, int64_t d0, float (&acc)[E]) {
  float part[4][E];
  LT_UNROLL for (int k = 0; k < 4; ++k)
    LT_UNROLL for (int i = 0; i < E; ++i) part[k][i] = 0.f;
  for (int32_t wd = 0; wd < hwords; ++wd) {
    const uint32_t bits = hbits[c * hwords + wd];
    const int32_t a_end = m < (wd + 1) * 32 ? m : (wd + 1) * 32;
    for (int32_t a0 = wd * 32; a0 < a_end; a0 += 4) {
      LT_UNROLL for (int k = 0; k < 4; ++k) {
        const int32_t a = a0 + k;
        const bool neg = (bits >> (a % 32)) & 1u;
        LT_UNROLL for (int i = 0; i < E; ++i) {
          const float zv = z[base + a * P + d0 + i];
          part[k][i] += neg ? -zv : zv;
        }
      }
    }
  }
  LT_UNROLL for (int i = 0; i < E; ++i) acc[i] = (part[0][i] + part[1][i]) + (part[2][i] + part[3][i]);
}

// One output of the factor mix (mix_chunk for E = 1).
LT_DEV float mix_one(simt::sptr<float> z, simt::gptr<const uint32_t> hbits, int32_t m, int32_t hwords, int64_t P,
                     int64_t base, int64_t c, int64_t d) {
  float acc[1];
  mix_chunk<1>(z, hbits, m, hwords, P, base, c, d, acc);
  return acc[0];
}

template <class T, int E>
LT_DEV void block_mode(const KParams<T>& p) {
  const int64_t n = p.n, P = int64_t(1) << p.log2p, cps = P / E, chunks = n / E;
  const uint32_t tid = simt::thread_linear(), nthreads = simt::block_dim().x, lane = simt::lane_id();
  const int64_t iters = (chunks + nthreads - 1) / nthreads;
  simt::sptr<float> z = simt::dynamic_smem<float>();
  for (int64_t row = simt::block_idx().x; row < p.rows; row += simt::grid_dim().x) {
    // 1-3: registers and lanes
    for (int64_t it = 0; it < iters; ++it) {
      const int64_t j = it * nthreads + tid;
      const bool valid = j < chunks;
      float v[E];
      if (valid) load_chunk<T, E>(p, row * p.x_row_stride + j * E, v);
      else { LT_UNROLL for (int i = 0; i < E; ++i) v[i] = 0.f; }
      butterflies_in_registers<E>(v);
      butterflies_across_lanes<E>(v, lane, cps);
      if (valid) { LT_UNROLL for (int i = 0; i < E; ++i) z[j * E + i] = v[i]; }
    }
    simt::sync_block();
    // 4: index bits above the lanes', up to 4 per pass
    for (int64_t h = int64_t(32) * E; h < P;) {
      int r = 0;
      while (r < 4 && (h << (r + 1)) <= P) ++r;
      switch (r) {
        case 1: smem_pass<1>(z, n, P, h); break;
        case 2: smem_pass<2>(z, n, P, h); break;
        case 3: smem_pass<3>(z, n, P, h); break;
        default: smem_pass<4>(z, n, P, h); break;
      }
      h <<= r;
      simt::sync_block();
    }
    // 5-6: factor mix and store
    for (int64_t j = tid; j < chunks; j += nthreads) {
      float acc[E];
      if (p.m == 1) {
        LT_UNROLL for (int i = 0; i < E; ++i) acc[i] = z[j * E + i];
      } else {
        const int64_t c = (j * E) / P, d0 = (j * E) % P;
        mix_chunk<E>(z, p.hbits, p.m, p.hwords, P, 0, c, d0, acc);
      }
      store_chunk<T, E>(p, row * n + j * E, acc);
    }
    simt::sync_block();  // shared memory is reused by the next row
  }
}

template <class T, int E>
LT_DEV void hadamard_body(const KParams<T>& p) {
  if (p.block_mode) block_mode<T, E>(p);
  else warp_mode<T, E>(p);
}

// ---------------------------------------------------------------- host-side launch planning
inline int chunk_elems(int log2p) { return log2p >= 3 ? 8 : (1 << log2p); }

inline bool uses_block_mode(const HadamardParams& hp) {
  return hp.m > 1 || (int64_t(1) << hp.log2p) > int64_t(32) * chunk_elems(hp.log2p);
}

inline LaunchCfg launch_config(const HadamardParams& hp, int64_t max_grid) {
  LaunchCfg c;
  const int E = chunk_elems(hp.log2p);
  if (uses_block_mode(hp)) {
    const int64_t chunks = hp.n / E;
    const int64_t threads = std::min<int64_t>(kBlockThreads, ((chunks + 31) / 32) * 32);
    c.block = {static_cast<uint32_t>(threads), 1, 1};
    c.grid = {static_cast<uint32_t>(std::min<int64_t>(hp.rows, max_grid)), 1, 1};
    c.smem = static_cast<size_t>(hp.n) * sizeof(float);
  } else {
    const int64_t rows_per_block = (kWarpModeThreads / 32) * (32 / (hp.n / E));
    c.block = {static_cast<uint32_t>(kWarpModeThreads), 1, 1};
    c.grid = {static_cast<uint32_t>(std::min<int64_t>((hp.rows + rows_per_block - 1) / rows_per_block, max_grid)), 1, 1};
  }
  return c;
}

template <class T>
KParams<T> make_kparams(const HadamardParams& hp) {
  KParams<T> k;
  k.x = simt::make_gptr(static_cast<const T*>(hp.x), hp.x_span, "x");
  k.y = simt::make_gptr(static_cast<T*>(hp.y), hp.y_span, "y");
  k.hbits = simt::make_gptr(hp.hbits, hp.hbits_span, "hbits");
  k.rows = hp.rows;
  k.n = hp.n;
  k.x_row_stride = hp.x_row_stride;
  k.m = hp.m;
  k.log2p = hp.log2p;
  k.hwords = hp.hwords;
  k.scale = hp.scale;
  k.vec_ok = hp.vec_ok;
  k.block_mode = uses_block_mode(hp);
  return k;
}

// Calls f.template operator()<T, E>() for the storage type and chunk width of hp.
template <class F>
void dispatch(const HadamardParams& hp, F&& f) {
  dispatch_dtype_chunk(hp.dtype, chunk_elems(hp.log2p), f);
}

}  // namespace lt::hadamard
