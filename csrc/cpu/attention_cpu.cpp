// CPU kernels of the sparse-attention family: tiled FlashAttention (online softmax, BLAS on tiles),
// at::parallel_for over (batch, head, query tile) in the forward and over (batch, head group, key
// tile) in the backward. Only the tiles the mask touches are visited (csrc/common/attn_mask.h), and
// elements are tested only in tiles a row does not cover completely. float32 and float64 compute;
// float16 / bfloat16 inputs are computed in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <vector>

#include "common/attn_host.h"
#include "common/nonfinite.h"
#include "cpu/cpu_kernels.h"
#include "cpu/multiversion.h"

namespace lt::attn {
namespace {

using cpu::dot;
using cpu::exp_neg;
using cpu::exp_row;
using cpu::mm;
using cpu::row_finite;
using cpu::row_max;

// LT_ATTN_TILES="BQ,KC": tuning override of the two tile sizes below (docs/tuning.md), read once
// when the library loads. A value that is not two integers with 1 <= BQ <= 4096 and
// 64 <= KC <= 65536 is reported on stderr and the defaults are kept.
struct Tiles {
  int64_t bq = 64, kc = 256;
};
static Tiles tiles_from_env() {
  Tiles t;
  const char* e = std::getenv("LT_ATTN_TILES");
  if (!e) return t;
  long long a = 0, b = 0;
  int n = 0;
  if (std::sscanf(e, " %lld , %lld %n", &a, &b, &n) == 2 && e[n] == '\0' && a >= 1 && a <= 4096 && b >= 64 &&
      b <= 65536)
    return Tiles{a, b};
  std::fprintf(stderr,
               "longtune: ignoring LT_ATTN_TILES=\"%s\": expected \"BQ,KC\" with 1 <= BQ <= 4096 query rows and "
               "64 <= KC <= 65536 key columns (docs/tuning.md); using the defaults %lld,%lld\n",
               e, static_cast<long long>(t.bq), static_cast<long long>(t.kc));
  return t;
}
static const Tiles kTiles = tiles_from_env();
// BQ query rows per task; keys in chunks of up to KC columns per GEMM (consecutive non-empty
// tiles of BT keys: the mask granularity), so MKL sees a few larger products instead of many 64^3.
static const int64_t BQ = kTiles.bq, KC = kTiles.kc;
constexpr int64_t BT = 64;

// Query tiles in the order 0, n-1, 1, n-2, ...: at::parallel_for hands each thread a contiguous
// range of tasks, and causal tiles grow in cost with their index, so this keeps threads balanced.
inline int64_t zigzag(int64_t i, int64_t n) { return (i & 1) ? n - 1 - i / 2 : i / 2; }

// Consecutive key chunks [j0, j1) covering the non-empty key tiles (<= 2 tile ranges).
void make_chunks(const Ranges& tr, int64_t nk, std::vector<std::pair<int64_t, int64_t>>& out) {
  out.clear();
  const int64_t step = std::max<int64_t>(1, KC / BT);
  for (int32_t u = 0; u < tr.n; ++u)
    for (int64_t t = tr.lo[u]; t < tr.hi[u]; t += step)
      out.emplace_back(t * BT, std::min(std::min(tr.hi[u], t + step) * BT, nk));
}

// p[c] = p[c] * (dp[c] - D) * scale (dS, in place over P)
template <class T>
LT_ALWAYS_INLINE void ds_row(T* __restrict p, const T* __restrict dp, int64_t n, T D, T scale) {
  for (int64_t c = 0; c < n; ++c) p[c] = p[c] * (dp[c] - D) * scale;
}

// Logit softcapping of a block of scores (rows x cols, ld KC) in place: s -> cap * tanh(s / cap);
// with th != nullptr the tanh values are also kept there (the backward's 1 - tanh^2).
template <class T>
void softcap_block(T* S, int64_t rows, int64_t cols, T cap, T* th) {
  const T inv = T(1) / cap;
  for (int64_t r = 0; r < rows; ++r) {
    T* s = S + r * KC;
    T* t = th ? th + r * KC : nullptr;
    for (int64_t c = 0; c < cols; ++c) {
      const T x = std::tanh(s[c] * inv);
      if (t) t[c] = x;
      s[c] = cap * x;
    }
  }
}

// p[c] = p[c] * (dp[c] - D) * scale * (1 - th[c]^2) (dS through the softcap's tanh, in place over P)
template <class T>
LT_ALWAYS_INLINE void ds_row_capped(T* __restrict p, const T* __restrict dp, const T* __restrict th, int64_t n, T D,
                                    T scale) {
  for (int64_t c = 0; c < n; ++c) p[c] = p[c] * (dp[c] - D) * scale * (T(1) - th[c] * th[c]);
}

// Tensor views: element (b, row, head) of a (B, N, H, D) or packed (T, H, D) tensor.
template <class T>
struct View {
  T* p = nullptr;
  int64_t sb = 0, sn = 0, sh = 0;
  View() = default;
  View(const at::Tensor& t, bool varlen)
      : p(static_cast<T*>(t.data_ptr())),
        sb(varlen ? 0 : t.stride(0)),
        sn(t.stride(varlen ? 0 : 1)),
        sh(t.stride(varlen ? 1 : 2)) {}
  T* at(int64_t b, int64_t row, int64_t h) const { return p + b * sb + row * sn + h * sh; }
};

// lse / Dsum index of (b, e, sequence-local row i).
struct RowIndex {
  int64_t sb, sh;
  int64_t operator()(const AttnArgs& a, int64_t b, int64_t e, int64_t i) const {
    return b * sb + e * sh + a.q_start(b) + i;
  }
};
RowIndex row_index(const AttnArgs& a) { return a.varlen ? RowIndex{0, a.total_q} : RowIndex{a.heads * a.nq, a.nq}; }

// Masks S (rows x cols at key j0, ld KC) with -inf where the element is not visible.
template <class T>
void apply_mask(T* S, int64_t rows, int64_t cols, int64_t j0, const Ranges* rr, const uint8_t* kpm) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t j1 = j0 + cols;
  for (int64_t r = 0; r < rows; ++r) {
    T* s = S + r * KC - j0;  // indexed by key
    const Ranges& g = rr[r];
    if (!row_covers(g, j0, j1)) {  // blank the gaps between the row's (<= 2, sorted) ranges
      int64_t from = j0;
      for (int32_t t = 0; t < g.n; ++t) {
        const int64_t lo = std::clamp(g.lo[t], j0, j1), hi = std::clamp(g.hi[t], j0, j1);
        std::fill(s + from, s + std::max(from, lo), ninf);
        from = std::max(from, hi);
      }
      std::fill(s + from, s + j1, ninf);
    }
    if (kpm)
      for (int64_t c = j0; c < j1; ++c)
        if (!kpm[c]) s[c] = ninf;
  }
}

// Key j of the chunk [j0, j1) is visible to row r of the block.
struct Visible {
  const Ranges* rr;
  const uint8_t* kpm;
  int64_t j0;
  bool operator()(int64_t r, int64_t jl) const {
    const int64_t j = j0 + jl;
    return in_ranges(rr[r], j) && (!kpm || kpm[j]);
  }
};

// True when some row of the block does not see some key of [j0, j1).
bool chunk_partial(const Ranges* rr, int64_t rows, int64_t j0, int64_t j1, const uint8_t* kpm) {
  for (int64_t r = 0; r < rows; ++r)
    if (!row_covers(rr[r], j0, j1)) return true;
  if (kpm)
    for (int64_t c = j0; c < j1; ++c)
      if (!kpm[c]) return true;
  return false;
}

// C (ldc) += op(A) B over one key chunk of a partially masked block, where A (rows x cols, ld KC)
// holds P or dS, and a pair (r, j) the mask hides contributes nothing: a GEMM would multiply A's 0
// there by B's row, which is NaN when that row (a key, or a query) holds a NaN / inf, and so let a
// row read what it never sees. The GEMM goes into `tmp`; an output row that comes out non-finite
// is recomputed over its visible pairs only (the slow path runs only on non-finite data).
// by_row: output row r = sum_j A[r, j] B[j] (B's rows are keys); else output row j = sum_r A[r, j] B[r].
template <class T>
void acc_visible(bool by_row, int64_t rows, int64_t cols, int64_t d, const T* A, const T* B, int64_t ldb, T* C,
                 int64_t ldc, T* tmp, const Visible& vis) {
  const int64_t nout = by_row ? rows : cols, nsum = by_row ? cols : rows;
  mm<T>(!by_row, false, nout, d, nsum, T(1), A, KC, B, ldb, T(0), tmp, d);
  for (int64_t o = 0; o < nout; ++o) {
    T* t = tmp + o * d;
    if (!row_finite(t, d)) {
      std::fill(t, t + d, T(0));
      for (int64_t x = 0; x < nsum; ++x) {
        const int64_t r = by_row ? o : x, j = by_row ? x : o;
        if (!vis(r, j)) continue;
        const T a = A[r * KC + j];
        const T* bp = B + x * ldb;
        for (int64_t c = 0; c < d; ++c) t[c] += a * bp[c];
      }
    }
    T* cp = C + o * ldc;
    for (int64_t c = 0; c < d; ++c) cp[c] += t[c];
  }
}

// sum_j P[r, j] dP[r, j] over the visible keys of the chunk (the same rule as acc_visible).
template <class T>
T dot_visible(const T* p, const T* dp, int64_t cols, int64_t r, bool partial, const Visible& vis) {
  const T s = dot(p, dp, cols);
  if (!partial || std::isfinite(s)) return s;
  T t = 0;
  for (int64_t j = 0; j < cols; ++j)
    if (vis(r, j)) t += p[j] * dp[j];
  return t;
}

template <class T>
void fwd_impl(const AttnArgs& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
              at::Tensor& lse) {
  const View<T> Q(q, a.varlen), K(k, a.varlen), V(v, a.varlen), O(out, a.varlen);
  T* L = lse.data_ptr<T>();
  const RowIndex ri = row_index(a);
  const HeadMap hm = a.hm();
  const int64_t d = a.d, nqt = (a.nq + BQ - 1) / BQ;
  const uint8_t* kpm = a.kpm.defined() ? a.kpm.data_ptr<uint8_t>() : nullptr;
  const T scale = static_cast<T>(a.scale), cap = static_cast<T>(a.softcap);
  at::parallel_for(0, a.batch * a.heads * nqt, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(BQ * KC), acc(BQ * d), m(BQ), l(BQ), tmp(BQ * d);
    std::vector<Ranges> rr(BQ);
    std::vector<std::pair<int64_t, int64_t>> chunks;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qt = zigzag(task % nqt, nqt), e = (task / nqt) % a.heads, b = task / (nqt * a.heads);
      const int64_t nq = a.q_len(b), nk = a.k_len(b), i0 = qt * BQ;
      if (i0 >= nq) continue;
      const int64_t rows = std::min(BQ, nq - i0);
      const SeqMask mk = bind(a.mask, nq, nk, int32_t(e));
      const int32_t qh = hm.q_head(int32_t(e)), kh = hm.kv_head(int32_t(e));
      const uint8_t* kp = kpm ? kpm + b * a.nk : nullptr;
      for (int64_t r = 0; r < rows; ++r) rr[r] = mk.row_ranges(i0 + r);
      make_chunks(tile_ranges<true>(mk, i0, i0 + rows, BT), nk, chunks);
      std::fill(acc.begin(), acc.begin() + rows * d, T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      const T* qp = Q.at(b, a.q_start(b) + i0, qh);
      for (const auto& [j0, j1] : chunks) {
        const int64_t cols = j1 - j0;
        mm<T>(false, true, rows, cols, d, scale, qp, Q.sn, K.at(b, a.k_start(b) + j0, kh), K.sn, T(0), S.data(), KC);
        if (cap > T(0)) softcap_block<T>(S.data(), rows, cols, cap, nullptr);
        apply_mask(S.data(), rows, cols, j0, rr.data(), kp);
        for (int64_t r = 0; r < rows; ++r) {
          T* s = S.data() + r * KC;
          if (is_nan(m[r])) {  // the row read a NaN (or +inf) score: it stays NaN
            std::fill(s, s + cols, T(0));
            continue;
          }
          const T mx = nan_max(row_max(s, cols), m[r]);  // NaN if a visible score is NaN
          if (mx == -std::numeric_limits<T>::infinity()) {  // nothing visible yet in this row
            std::fill(s, s + cols, T(0));
            continue;
          }
          if (!(mx < std::numeric_limits<T>::infinity())) {
            // a NaN score, or +inf (inf - inf in the softmax): the row's output and lse are NaN
            const T nan = std::numeric_limits<T>::quiet_NaN();
            m[r] = l[r] = nan;
            std::fill(acc.begin() + r * d, acc.begin() + (r + 1) * d, nan);
            std::fill(s, s + cols, T(0));
            continue;
          }
          const T alpha = exp_neg(m[r] - mx);  // m = -inf -> 0
          l[r] = l[r] * alpha + exp_row(s, cols, mx);
          if (alpha != T(1)) {
            T* o = acc.data() + r * d;
            for (int64_t c = 0; c < d; ++c) o[c] *= alpha;
          }
          m[r] = mx;
        }
        const T* vp = V.at(b, a.k_start(b) + j0, kh);
        if (chunk_partial(rr.data(), rows, j0, j1, kp))
          acc_visible<T>(true, rows, cols, d, S.data(), vp, V.sn, acc.data(), d, tmp.data(),
                         Visible{rr.data(), kp, j0});
        else mm<T>(false, false, rows, d, cols, T(1), S.data(), KC, vp, V.sn, T(1), acc.data(), d);
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* o = O.at(b, a.q_start(b) + i0 + r, e);
        const bool empty = l[r] == T(0);  // no visible key: output 0, lse -inf (NaN l: a NaN row)
        const T inv = empty ? T(0) : T(1) / l[r];
        for (int64_t c = 0; c < d; ++c) o[c] = acc[r * d + c] * inv;
        L[ri(a, b, e, i0 + r)] = empty ? -std::numeric_limits<T>::infinity() : m[r] + std::log(l[r]);
      }
    }
  });
}

// Backward, one task per (batch, head group, query tile), looping over the group's output heads:
// pass 1 recomputes P = exp(S - lse) and dP = dO V^T for every visible key tile of the row block and
// forms D = rowsum(P * dP) from exactly these values (so a row with one visible key gets dS = 0
// exactly, as in autograd's softmax backward; the FlashAttention shortcut D = rowsum(dO * O) leaves
// the rounding of dP there); pass 2 forms dS = P (dP - D) scale and accumulates dQ += dS K (rows
// owned by the task), dK += dS^T Q and dV += P^T dO. With enough (batch, group) pairs a task takes
// all query tiles of one pair and owns its key/value rows; otherwise (MQA at batch 1) query tiles
// are split too and dK / dV go into per-thread buffers summed at the end.
template <class T>
void bwd_impl(const AttnArgs& a, const at::Tensor& go, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const View<T> Q(q, a.varlen), K(k, a.varlen), V(v, a.varlen), dO(go, a.varlen), dQ(dq, a.varlen);
  const T* L = lse.data_ptr<T>();
  const RowIndex ri = row_index(a);
  const HeadMap hm = a.hm();
  const int64_t d = a.d, nqt = (a.nq + BQ - 1) / BQ;
  const uint8_t* kpm = a.kpm.defined() ? a.kpm.data_ptr<uint8_t>() : nullptr;
  const T scale = static_cast<T>(a.scale), cap = static_cast<T>(a.softcap);
  const int nthreads = at::get_num_threads();
  std::vector<at::Tensor> dk_parts(nthreads), dv_parts(nthreads);
  const int64_t ngroups = hm.groups(), gsize = hm.group_size();
  // Scratch of one worker; `unit` handles one (batch, group, query tile) into the dK / dV views.
  struct Scratch {
    std::vector<T> P, dP, Th, D = std::vector<T>(BQ), tmp;  // Th: tanh of the softcapped scores
    std::vector<char> partial;
    std::vector<Ranges> rr = std::vector<Ranges>(BQ);
    std::vector<std::pair<int64_t, int64_t>> chunks;
  };
  auto unit = [&](int64_t b, int64_t g, int64_t qt, const View<T>& dK, const View<T>& dV, Scratch& sc) {
    std::vector<T>& P = sc.P;
    std::vector<T>& dP = sc.dP;
    std::vector<T>& Th = sc.Th;
    std::vector<T>& D = sc.D;
    std::vector<Ranges>& rr = sc.rr;
    std::vector<std::pair<int64_t, int64_t>>& chunks = sc.chunks;
    std::vector<T>& tmp = sc.tmp;
    std::vector<char>& partial = sc.partial;
    if (tmp.size() < size_t(std::max(BQ, KC) * a.d)) tmp.resize(std::max(BQ, KC) * a.d);
    const int64_t nq = a.q_len(b), nk = a.k_len(b), i0 = qt * BQ;
    if (i0 >= nq) return;
    const int64_t rows = std::min(BQ, nq - i0);
    const uint8_t* kp = kpm ? kpm + b * a.nk : nullptr;
    for (int64_t t = 0; t < gsize; ++t) {
      const int32_t e = hm.member(int32_t(g), int32_t(t)), qh = hm.q_head(e), kh = hm.kv_head(e);
      const SeqMask mk = bind(a.mask, nq, nk, e);
      for (int64_t r = 0; r < rows; ++r) rr[r] = mk.row_ranges(i0 + r);
      make_chunks(tile_ranges<true>(mk, i0, i0 + rows, BT), nk, chunks);
      if (chunks.empty()) continue;
      const size_t need = chunks.size() * BQ * KC;
      if (P.size() < need) {
        P.resize(need);
        dP.resize(need);
      }
      if (cap > T(0) && Th.size() < need) Th.resize(need);
      const T* qp = Q.at(b, a.q_start(b) + i0, qh);
      const T* gp = dO.at(b, a.q_start(b) + i0, e);
      std::fill(D.begin(), D.end(), T(0));
      partial.assign(chunks.size(), 0);
      for (size_t x = 0; x < chunks.size(); ++x) {  // pass 1: P, dP, D
        const int64_t j0 = chunks[x].first, cols = chunks[x].second - j0;
        T* S = P.data() + x * BQ * KC;
        T* dPx = dP.data() + x * BQ * KC;
        mm<T>(false, true, rows, cols, d, scale, qp, Q.sn, K.at(b, a.k_start(b) + j0, kh), K.sn, T(0), S, KC);
        if (cap > T(0)) softcap_block<T>(S, rows, cols, cap, Th.data() + x * BQ * KC);
        apply_mask(S, rows, cols, j0, rr.data(), kp);
        mm<T>(false, true, rows, cols, d, T(1), gp, dO.sn, V.at(b, a.k_start(b) + j0, kh), V.sn, T(0), dPx, KC);
        partial[x] = chunk_partial(rr.data(), rows, j0, chunks[x].second, kp);
        const Visible vis{rr.data(), kp, j0};
        for (int64_t r = 0; r < rows; ++r) {
          const T lr = L[ri(a, b, e, i0 + r)];
          T* s = S + r * KC;
          if (lr == -std::numeric_limits<T>::infinity()) std::fill(s, s + cols, T(0));  // empty row
          else exp_row(s, cols, lr);  // a NaN lse (NaN row) gives NaN
          D[r] += dot_visible(s, dPx + r * KC, cols, r, partial[x] != 0, vis);
        }
      }
      T* dqp = dQ.at(b, a.q_start(b) + i0, qh);
      for (size_t x = 0; x < chunks.size(); ++x) {  // pass 2: dS, dV, dK, dQ
        const int64_t j0 = chunks[x].first, cols = chunks[x].second - j0;
        T* S = P.data() + x * BQ * KC;
        const T* dPx = dP.data() + x * BQ * KC;
        const int64_t kr = a.k_start(b) + j0;
        auto ds_rows = [&](T* Sx, const T* dPc, size_t xi, int64_t nr, int64_t nc) {
          if (cap > T(0)) {
            const T* th = Th.data() + xi * BQ * KC;
            for (int64_t r = 0; r < nr; ++r) ds_row_capped(Sx + r * KC, dPc + r * KC, th + r * KC, nc, D[r], scale);
          } else {
            for (int64_t r = 0; r < nr; ++r) ds_row(Sx + r * KC, dPc + r * KC, nc, D[r], scale);
          }
        };
        if (!partial[x]) {
          mm<T>(true, false, cols, d, rows, T(1), S, KC, gp, dO.sn, T(1), dV.at(b, kr, kh), dV.sn);
          ds_rows(S, dPx, x, rows, cols);
          mm<T>(true, false, cols, d, rows, T(1), S, KC, qp, Q.sn, T(1), dK.at(b, kr, kh), dK.sn);
          mm<T>(false, false, rows, d, cols, T(1), S, KC, K.at(b, kr, kh), K.sn, T(1), dqp, dQ.sn);
        } else {  // masked pairs contribute nothing, even next to a non-finite q, k, v or dO row
          const Visible vis{rr.data(), kp, j0};
          acc_visible<T>(false, rows, cols, d, S, gp, dO.sn, dV.at(b, kr, kh), dV.sn, tmp.data(), vis);
          ds_rows(S, dPx, x, rows, cols);
          acc_visible<T>(false, rows, cols, d, S, qp, Q.sn, dK.at(b, kr, kh), dK.sn, tmp.data(), vis);
          acc_visible<T>(true, rows, cols, d, S, K.at(b, kr, kh), K.sn, dqp, dQ.sn, tmp.data(), vis);
        }
      }
    }
  };
  if (a.batch * ngroups >= 4 * int64_t(nthreads)) {
    // Enough (batch, group) pairs: a task owns its group's key/value rows, dK / dV go straight out.
    const View<T> dK(dk, a.varlen), dV(dv, a.varlen);
    at::parallel_for(0, a.batch * ngroups, 1, [&](int64_t begin, int64_t end) {
      Scratch sc;
      for (int64_t t = begin; t < end; ++t)
        for (int64_t qt = 0; qt < nqt; ++qt) unit(t / ngroups, t % ngroups, qt, dK, dV, sc);
    });
    return;
  }
  // Few groups (MQA, batch 1): split the query tiles too; dK / dV into per-thread buffers.
  at::parallel_for(0, a.batch * ngroups * nqt, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    if (!dk_parts[tid].defined()) {
      dk_parts[tid] = at::zeros(dk.sizes(), dk.options());
      dv_parts[tid] = at::zeros(dv.sizes(), dv.options());
    }
    const View<T> dK(dk_parts[tid], a.varlen), dV(dv_parts[tid], a.varlen);
    Scratch sc;
    for (int64_t task = begin; task < end; ++task)
      unit(task / (nqt * ngroups), (task / nqt) % ngroups, zigzag(task % nqt, nqt), dK, dV, sc);
  });
  bool first = true;
  for (int t = 0; t < nthreads; ++t) {
    if (!dk_parts[t].defined()) continue;
    if (first) {
      dk.copy_(dk_parts[t]);
      dv.copy_(dv_parts[t]);
    } else {
      dk.add_(dk_parts[t]);
      dv.add_(dv_parts[t]);
    }
    first = false;
  }
}

at::ScalarType compute_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                       const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& cu_q,
                                       const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                                       double scale, at::IntArrayRef mask, double softcap) {
  const char* op = "sparse_attention_fwd";
  const AttnArgs a = check_attn_args(op, q_, k_, v_, kpm, cu_q, cu_k, max_q, max_k, scale, parse_mask(op, mask),
                                     /*allow_f64=*/true, softcap);
  const auto ct = compute_type(q_);
  const at::Tensor q = last_dim_contiguous(q_.to(ct)), k = last_dim_contiguous(k_.to(ct)),
                   v = last_dim_contiguous(v_.to(ct));
  at::Tensor out = empty_out(a, q), lse = empty_lse(a, q);
  if (out.numel() == 0 && lse.numel() == 0) return {out.to(q_.scalar_type()), lse};
  if (ct == at::kDouble) fwd_impl<double>(a, q, k, v, out, lse);
  else fwd_impl<float>(a, q, k, v, out, lse);
  return {out.to(q_.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& go_, const at::Tensor& q_, const at::Tensor& k_,
                                                   const at::Tensor& v_, const at::Tensor& out_, const at::Tensor& lse_,
                                                   const std::optional<at::Tensor>& kpm,
                                                   const std::optional<at::Tensor>& cu_q,
                                                   const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                                                   double scale, at::IntArrayRef mask, double softcap) {
  const char* op = "sparse_attention_bwd";
  const AttnArgs a = check_attn_args(op, q_, k_, v_, kpm, cu_q, cu_k, max_q, max_k, scale, parse_mask(op, mask),
                                     /*allow_f64=*/true, softcap);
  check_bwd_tensors(op, a, q_, go_, out_, lse_);
  const auto ct = compute_type(q_);
  const at::Tensor q = last_dim_contiguous(q_.to(ct)), k = last_dim_contiguous(k_.to(ct)),
                   v = last_dim_contiguous(v_.to(ct)), go = last_dim_contiguous(go_.to(ct)), lse = lse_.contiguous();
  at::Tensor dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options()),
             dv = at::zeros(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
  } else if (ct == at::kDouble) {
    bwd_impl<double>(a, go, q, k, v, lse, dq, dk, dv);
  } else {
    bwd_impl<float>(a, go, q, k, v, lse, dq, dk, dv);
  }
  return {dq.to(q_.scalar_type()), dk.to(k_.scalar_type()), dv.to(v_.scalar_type())};
}

}  // namespace
}  // namespace lt::attn

TORCH_LIBRARY_IMPL(longtune, CPU, m) {
  m.impl("sparse_attention_fwd", &lt::attn::fwd);
  m.impl("sparse_attention_bwd", &lt::attn::bwd);
}

namespace lt::attn {
namespace {

at::Tensor mask_ranges(int64_t nq, int64_t nk, int64_t head, int64_t heads, at::IntArrayRef mask, bool cols, int64_t i0,
                       int64_t i1, int64_t tile) {
  const char* op = "attention_mask_ranges";
  LT_CHECK(op, nq >= 0 && nk >= 0 && heads >= 1 && head >= 0 && head < heads, "bad sizes nq=", nq, " nk=", nk,
           " head=", head, " heads=", heads);
  // Reuse the op's checks on a tiny meta problem so the mask is exactly the kernels'.
  const auto opts = at::TensorOptions().device(at::kMeta).dtype(at::kFloat);
  const at::Tensor q = at::empty({1, nq, heads, 1}, opts), k = at::empty({1, nk, heads, 1}, opts);
  AttnArgs a =
      check_attn_args(op, q, k, k, std::nullopt, std::nullopt, std::nullopt, 0, 0, 1.0, parse_mask(op, mask), false);
  const SeqMask mk = bind(a.mask, nq, nk, int32_t(head));
  auto fill = [](int64_t* o, const Ranges& r) {
    for (int t = 0; t < 2; ++t) {
      o[2 * t] = t < r.n ? r.lo[t] : 0;
      o[2 * t + 1] = t < r.n ? r.hi[t] : 0;
    }
  };
  if (tile > 0) {
    at::Tensor out = at::empty({2, 2}, at::kLong);
    fill(out.data_ptr<int64_t>(), cols ? tile_ranges<false>(mk, i0, i1, tile) : tile_ranges<true>(mk, i0, i1, tile));
    return out;
  }
  const int64_t n = cols ? nk : nq;
  at::Tensor out = at::empty({n, 2, 2}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) fill(o + 4 * i, cols ? mk.col_ranges(i) : mk.row_ranges(i));
  return out;
}

}  // namespace
}  // namespace lt::attn

TORCH_LIBRARY_IMPL(longtune, CompositeExplicitAutograd, m) { m.impl("attention_mask_ranges", &lt::attn::mask_ranges); }
