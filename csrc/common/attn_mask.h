// Mask and tile math of the sparse-attention family, shared by the CPU kernel, the CUDA kernels and
// the emulator (host + device). The spec is python/longtune/reference/attention.py.
//
// A mask is a handful of integers (MaskSpec), bound to one sequence and one output head (SeqMask).
// For every query row the visible keys form at most two disjoint index ranges (row_ranges), and for
// every key column the queries that see it form at most two ranges (col_ranges): a window / S^2
// group / causal bound gives one contiguous range, LM-Infinite's global tokens or the wrapped group
// of LongLoRA's roll formulation the second one. Kernels iterate only over the tiles these ranges
// touch (tile_ranges: the union over a tile's rows, in tile units), so empty tiles are never loaded,
// and test single elements (visible) only in tiles a row does not cover completely.
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace lt::attn {

enum class S2Mode : int32_t { None = 0, LeakFree = 1, Roll = 2 };

// Per-launch constants (int64 positions everywhere). The ops receive a mask as one `int[] mask`
// argument (the encoding below, written by python/longtune/ops/mask.py:AttentionMask.to_list) and
// parse it once on the host (attn_host.h:parse_mask), which validates every field.
struct MaskSpec {
  bool causal = true;
  int64_t group = 0;          // S^2 group size G (0: no S^2); even, >= 2
  S2Mode mode = S2Mode::None;
  int64_t window_left = -1;   // < 0: unbounded; visible iff pq - pk < window_left (or 0 <= pk < n_global)
  int64_t window_right = -1;  // < 0: unbounded; visible iff pk - pq < window_right
  int64_t n_global = 0;       // keys at positions [0, n_global) are global tokens
  int64_t q_offset = -1;      // < 0: bottom-right (q_pos0 = kv_offset + nk - nq)
  int64_t kv_offset = 0;      // absolute position of key 0 (< 0: keys before position 0, e.g. a halo)
  int64_t head_offset = 0;    // global index of the first local output head
  int64_t total_heads = 0;    // global number of output heads (0: the local heads are all of them)
  int32_t shift_from = 0;     // local output heads e >= shift_from are shifted by G/2
};

// The `int[] mask` encoding: kMaskLen integers, element kVersion = kMaskVersion, then one integer
// per field in this order (causal 0/1, s2_mode as S2Mode, the rest as in MaskSpec).
enum MaskSlot : int32_t {
  kVersion = 0,
  kCausal,
  kGroup,
  kMode,
  kWindowLeft,
  kWindowRight,
  kNGlobal,
  kQOffset,
  kKvOffset,
  kHeadOffset,
  kTotalHeads,
  kMaskLen
};
constexpr int64_t kMaskVersion = 1;

struct Ranges {
  int64_t lo[2] = {0, 0};
  int64_t hi[2] = {0, 0};
  int32_t n = 0;  // number of non-empty, disjoint, sorted ranges
};

LT_HD int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
LT_HD int64_t pos_mod(int64_t a, int64_t n) {  // n > 0, result in [0, n)
  const int64_t r = a % n;
  return r < 0 ? r + n : r;
}
LT_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
LT_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Adds [lo, hi) clipped to [0, n) to r, merging with an overlapping or adjacent range; keeps r sorted.
// (At most two ranges ever arise from one row or column.) Every index into lo / hi is a constant
// (no loop over r.n), so on a GPU a Ranges lives in registers, not in a local-memory stack frame.
LT_HD void add_range(Ranges& r, int64_t lo, int64_t hi, int64_t n) {
  lo = imax(lo, 0);
  hi = imin(hi, n);
  if (lo >= hi) return;
  const bool touch0 = r.n >= 1 && lo <= r.hi[0] && r.lo[0] <= hi;
  const bool touch1 = !touch0 && r.n == 2 && lo <= r.hi[1] && r.lo[1] <= hi;
  if (touch0 || touch1) {  // overlap or touch: merge
    if (touch0) {
      r.lo[0] = imin(r.lo[0], lo);
      r.hi[0] = imax(r.hi[0], hi);
    } else {
      r.lo[1] = imin(r.lo[1], lo);
      r.hi[1] = imax(r.hi[1], hi);
    }
    if (r.n == 2 && r.hi[0] >= r.lo[1]) {  // the merged range may now touch the other one
      r.hi[0] = imax(r.hi[0], r.hi[1]);
      r.lo[0] = imin(r.lo[0], r.lo[1]);
      r.n = 1;
    }
    return;
  }
  if (r.n == 2) {  // never for one row; for tile unions: collapse to the (conservative) hull
    r.lo[0] = imin(r.lo[0], lo);
    r.hi[0] = imax(r.hi[1], hi);
    r.n = 1;
    return;
  }
  if (r.n == 1 && lo < r.lo[0]) {
    r.lo[1] = r.lo[0];
    r.hi[1] = r.hi[0];
    r.lo[0] = lo;
    r.hi[0] = hi;
  } else if (r.n == 1) {
    r.lo[1] = lo;
    r.hi[1] = hi;
  } else {
    r.lo[0] = lo;
    r.hi[0] = hi;
  }
  r.n += 1;
}

// [a, b) in rolled coordinates of a ring of n -> original indices (r + s) mod n, as <= 2 ranges.
LT_HD void add_unrolled(Ranges& r, int64_t a, int64_t b, int64_t s, int64_t n) {
  if (a >= b) return;
  const int64_t lo = pos_mod(a + s, n), len = b - a;
  if (lo + len <= n) {
    add_range(r, lo, lo + len, n);
  } else {
    add_range(r, lo, n, n);
    add_range(r, 0, lo + len - n, n);
  }
}

// A MaskSpec bound to one sequence (nq queries, nk keys) and one output head.
struct SeqMask {
  int64_t nq = 0, nk = 0;
  int64_t qpos0 = 0, kpos0 = 0;
  int64_t group = 0, shift = 0;
  int64_t wl = -1, wr = -1, n_global = 0;
  bool causal = true, roll = false;

  LT_HD int64_t group_of(int64_t p) const { return floor_div(p + shift, group); }
  LT_HD bool is_global(int64_t p) const { return p >= 0 && p < n_global; }

  // The single-element truth (the reference's attention_mask).
  LT_HD bool visible(int64_t i, int64_t j) const {
    const int64_t pq = qpos0 + i, pk = kpos0 + j;
    if (roll) {  // nq == nk == ring size, no offsets (checked on the host)
      const int64_t rq = pos_mod(i - shift, nk), rk = pos_mod(j - shift, nk);
      if (rq / group != rk / group) return false;
      return !causal || rk <= rq;
    }
    if (causal && pk > pq) return false;
    if (wl >= 0 && !(pq - pk < wl) && !is_global(pk)) return false;
    if (wr >= 0 && !(pk - pq < wr)) return false;
    if (group > 0 && group_of(pq) != group_of(pk)) return false;
    return true;
  }

  // Keys visible to query row i: <= 2 disjoint sorted index ranges within [0, nk).
  LT_HD Ranges row_ranges(int64_t i) const {
    Ranges r;
    if (i < 0 || i >= nq) return r;
    if (roll) {
      const int64_t rq = pos_mod(i - shift, nk), g0 = (rq / group) * group;
      const int64_t g1 = causal ? rq + 1 : imin(g0 + group, nk);
      add_unrolled(r, g0, g1, shift, nk);
      return r;
    }
    const int64_t pq = qpos0 + i;
    int64_t lo = 0, hi = nk;  // key indices
    if (causal) hi = imin(hi, pq - kpos0 + 1);
    if (wr >= 0) hi = imin(hi, pq + wr - kpos0);
    if (group > 0) {
      const int64_t g = group_of(pq);
      lo = imax(lo, g * group - shift - kpos0);
      hi = imin(hi, (g + 1) * group - shift - kpos0);
    }
    if (wl >= 0) {
      add_range(r, imax(lo, -kpos0), imin(hi, n_global - kpos0), nk);  // global tokens
      add_range(r, imax(lo, pq - wl + 1 - kpos0), hi, nk);      // the window
    } else {
      add_range(r, lo, hi, nk);
    }
    return r;
  }

  // Queries that see key column j: <= 2 disjoint sorted index ranges within [0, nq).
  LT_HD Ranges col_ranges(int64_t j) const {
    Ranges r;
    if (j < 0 || j >= nk) return r;
    if (roll) {
      const int64_t rk = pos_mod(j - shift, nk), g0 = (rk / group) * group, g1 = imin(g0 + group, nk);
      add_unrolled(r, causal ? rk : g0, g1, shift, nk);
      return r;
    }
    const int64_t pk = kpos0 + j;
    int64_t lo = 0, hi = nq;  // query indices
    if (causal) lo = imax(lo, pk - qpos0);
    if (wr >= 0) lo = imax(lo, pk - wr + 1 - qpos0);
    if (wl >= 0 && !is_global(pk)) hi = imin(hi, pk + wl - qpos0);
    if (group > 0) {
      const int64_t g = group_of(pk);
      lo = imax(lo, g * group - shift - qpos0);
      hi = imin(hi, (g + 1) * group - shift - qpos0);
    }
    add_range(r, lo, hi, nq);
    return r;
  }
};

LT_HD SeqMask bind(const MaskSpec& m, int64_t nq, int64_t nk, int32_t head) {
  SeqMask s;
  s.nq = nq;
  s.nk = nk;
  s.kpos0 = m.kv_offset;
  s.qpos0 = m.kv_offset + (m.q_offset < 0 ? nk - nq : m.q_offset);
  s.group = m.mode == S2Mode::None ? 0 : m.group;
  s.shift = (s.group > 0 && head >= m.shift_from) ? s.group / 2 : 0;
  s.roll = m.mode == S2Mode::Roll && s.shift > 0 && nk > 0;
  s.wl = m.window_left;
  s.wr = m.window_right;
  s.n_global = m.n_global;
  s.causal = m.causal;
  return s;
}

// Tiles (of `tile` indices along the other axis) touched by rows [i0, i1) (Rows = true: the union
// of row_ranges, in key tiles) or by columns [i0, i1) (Rows = false: col_ranges, in query tiles).
// The result is <= 2 sorted, disjoint tile ranges; a tile between them is empty for every row.
template <bool Rows>
LT_HD Ranges tile_ranges(const SeqMask& m, int64_t i0, int64_t i1, int64_t tile) {
  Ranges u;
  const int64_t n_other = Rows ? m.nk : m.nq;
  const int64_t ntiles = (n_other + tile - 1) / tile;
  for (int64_t i = i0; i < i1; ++i) {
    const Ranges r = Rows ? m.row_ranges(i) : m.col_ranges(i);
    if (r.n >= 1) add_range(u, r.lo[0] / tile, (r.hi[0] + tile - 1) / tile, ntiles);
    if (r.n >= 2) add_range(u, r.lo[1] / tile, (r.hi[1] + tile - 1) / tile, ntiles);
  }
  return u;
}

// True when every row in [i0, i1) sees every key in [j0, j1) (no element needs testing). Rows past
// nq count as full (they are never stored).
LT_HD bool row_covers(const Ranges& r, int64_t j0, int64_t j1) {
  return (r.n >= 1 && r.lo[0] <= j0 && j1 <= r.hi[0]) || (r.n >= 2 && r.lo[1] <= j0 && j1 <= r.hi[1]);
}
LT_HD bool in_ranges(const Ranges& r, int64_t j) {
  return (r.n >= 1 && r.lo[0] <= j && j < r.hi[0]) || (r.n >= 2 && r.lo[1] <= j && j < r.hi[1]);
}

// Output head e -> query head and kv head (see reference.attention.head_map).
struct HeadMap {
  int32_t hq = 1, hkv = 1, heads = 1;  // heads = max(hq, hkv)
  LT_HD int32_t q_head(int32_t e) const { return hq >= hkv ? e : e % hq; }
  LT_HD int32_t kv_head(int32_t e) const { return hq >= hkv ? e / (hq / hkv) : e; }
  // Backward groups: the output heads that share one "owner" head (the kv head for GQA, the query
  // head for rSQA) -- a task that loops over a group writes the shared head's gradient alone.
  LT_HD int32_t groups() const { return hq >= hkv ? hkv : hq; }
  LT_HD int32_t group_size() const { return hq >= hkv ? hq / hkv : hkv / hq; }
  LT_HD int32_t member(int32_t g, int32_t t) const { return hq >= hkv ? g * (hq / hkv) + t : g + t * hq; }
};

}  // namespace lt::attn
