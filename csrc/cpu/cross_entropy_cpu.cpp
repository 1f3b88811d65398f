// CPU kernels of the fused linear + cross-entropy: the logits are never materialised. Forward: tasks
// of (vocabulary tile, row block) — logits tile = x_blk W_tile^T on BLAS, then per row the tile's
// max / sum of exp / target logit / sum of z, merged online into per-thread row states (merged
// across threads at the end). Backward: one task per vocabulary tile (it owns dW and dbias of the
// tile) looping over row blocks: recompute the logits tile, form d logits, dW_tile += dl^T x_blk,
// dx += dl W_tile into per-thread buffers. float32 / float64 compute (float16 / bfloat16 inputs are
// computed in float32); fp32 accumulation of dW in every case.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "common/cross_entropy_host.h"
#include "common/nonfinite.h"
#include "cpu/cpu_kernels.h"

namespace lt::cross_entropy {
namespace {

using cpu::exp_row;
using cpu::mm;
using cpu::row_finite;
using cpu::row_max;

constexpr int64_t BT = 128, BV = 1024;

template <class T>
struct Opts {
  int64_t ignore, V;
  T eps, zl, cap;
  bool has_bias;
  const T* cw = nullptr;  // class weights (V,) or nullptr
  T wsum = 0;             // their sum over the vocabulary
  // weight of row's target class, and the factor of p in d loss / dz without z-loss:
  // (1 - eps) w_t + eps sum(w) / V (1 without class weights)
  T wt(int64_t t) const { return cw ? cw[t] : T(1); }
  T pscale(T w_t) const { return cw ? (T(1) - eps) * w_t + eps * wsum / T(V) : T(1); }
  // per-row loss from lse, z[target], sum_c w_c z_c (sum z without class weights)
  T row_loss(T l, T zt, T sz, T w_t) const {
    T v;
    if (cw) {
      v = (T(1) - eps) * w_t * (l - zt);
      if (eps > 0) v += eps / T(V) * (wsum * l - sz);
    } else {
      v = (T(1) - eps) * (l - zt);
      if (eps > 0) v += eps * (l - sz / T(V));
    }
    if (zl > 0) v += zl * l * l;
    return v;
  }
};

template <class T>
Opts<T> make_opts(const CrossEntropyArgs& a, const at::Tensor& cw) {
  Opts<T> o{a.ignore_index, a.V, T(a.eps), T(a.z_loss), T(a.softcap), a.has_bias};
  if (a.has_cw) {
    o.cw = cw.data_ptr<T>();
    double s = 0;
    for (int64_t c = 0; c < a.V; ++c) s += o.cw[c];
    o.wsum = T(s);
  }
  return o;
}

// sum_c w_c z_c over a tile row (cwt: the tile's class weights or nullptr)
template <class T>
T weighted_sum(const T* l, int64_t cols, const T* cwt) {
  T sz = 0;
  if (cwt)
    for (int64_t c = 0; c < cols; ++c) sz += cwt[c] * l[c];
  else
    for (int64_t c = 0; c < cols; ++c) sz += l[c];
  return sz;
}

// First column holding the row's maximum mx (a NaN when mx is NaN); 0 for an empty row.
template <class T>
int64_t first_argmax(const T* l, int64_t cols, T mx) {
  if (mx != mx) {
    for (int64_t c = 0; c < cols; ++c)
      if (l[c] != l[c]) return c;
  } else {
    for (int64_t c = 0; c < cols; ++c)
      if (l[c] == mx) return c;
  }
  return 0;
}

// logits tile (rows x cols at vocab v0, ld BV): x_blk W_tile^T + b, soft-capped.
template <class T>
void logits_tile(const T* x, int64_t rows, int64_t d, const T* w, const T* b, int64_t v0, int64_t cols,
                 const Opts<T>& o, T* L) {
  mm<T>(false, true, rows, cols, d, T(1), x, d, w + v0 * d, d, T(0), L, BV);
  for (int64_t r = 0; r < rows; ++r) {
    T* l = L + r * BV;
    if (o.has_bias)
      for (int64_t c = 0; c < cols; ++c) l[c] += b[v0 + c];
    if (o.cap > 0)
      for (int64_t c = 0; c < cols; ++c) l[c] = o.cap * std::tanh(l[c] / o.cap);
  }
}

// One row of a logits tile turned into d loss / dz in place: on entry l = exp(z - m) with
// pf = (A + 2 z_loss lse) exp(m - lse) (m = lse in the recomputing backward, m = the row max in the
// one-pass kernel; A = Opts::pscale, 1 without class weights); then p (A + 2 z_loss lse) - eps w_c / V,
// minus (1 - eps) w_t at the target column t (-1: not in this tile), times the softcap derivative,
// times the row's loss gradient gr. cwt: the tile's class weights w_c (nullptr: all 1).
template <class T>
void dlogits_row(T* __restrict l, int64_t cols, T pf, int64_t t, const T* capd, T gr, const Opts<T>& o, const T* cwt,
                 T w_t) {
  const T base = o.eps / T(o.V);
  if (cwt)
    for (int64_t c = 0; c < cols; ++c) l[c] = l[c] * pf - base * cwt[c];
  else
    for (int64_t c = 0; c < cols; ++c) l[c] = l[c] * pf - base;
  if (t >= 0) l[t] -= (T(1) - o.eps) * w_t;
  if (o.cap > 0)
    for (int64_t c = 0; c < cols; ++c) l[c] *= capd[c];
  for (int64_t c = 0; c < cols; ++c) l[c] *= gr;
}

// Rows whose target is ignore_index read nothing: their dx is exactly 0 whatever W holds, and a
// NaN / inf in their x row must not reach dW through their zero d logits (a GEMM multiplies them).
// Returns the rows to use for dW: x itself, or - only when an ignored row is non-finite - a copy
// with the ignored rows zeroed.
template <class T>
const T* x_for_dw(const T* X, int64_t T_, int64_t d, const int64_t* tg, int64_t ignore, std::vector<T>& copy) {
  bool bad = false;
  for (int64_t r = 0; r < T_ && !bad; ++r) bad = tg[r] == ignore && !row_finite(X + r * d, d);
  if (!bad) return X;
  copy.assign(X, X + T_ * d);
  for (int64_t r = 0; r < T_; ++r)
    if (tg[r] == ignore) std::fill(copy.data() + r * d, copy.data() + (r + 1) * d, T(0));
  return copy.data();
}
template <class T>
void zero_ignored_rows(T* DX, int64_t T_, int64_t d, const int64_t* tg, int64_t ignore) {
  for (int64_t r = 0; r < T_; ++r)
    if (tg[r] == ignore) std::fill(DX + r * d, DX + (r + 1) * d, T(0));
}

template <class T>
void fwd_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& target,
              const at::Tensor& cw, const CrossEntropyArgs& a, at::Tensor& loss, at::Tensor& lse, at::Tensor& amax) {
  const Opts<T> o = make_opts<T>(a, cw);
  const T* X = x.data_ptr<T>();
  const T* W = w.data_ptr<T>();
  const T* Bp = a.has_bias ? b.data_ptr<T>() : nullptr;
  const int64_t* tg = target.data_ptr<int64_t>();
  const int64_t T_ = a.T, d = a.d, nvt = (a.V + BV - 1) / BV, nrb = (T_ + BT - 1) / BT;
  const int nth = at::get_num_threads();
  // per-thread row states: running max, sum exp(z - max), target logit, sum of (w_c) z; argmax
  std::vector<std::vector<T>> st(nth);
  std::vector<std::vector<int64_t>> sa(nth);
  at::parallel_for(0, nvt * nrb, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    auto& S = st[tid];
    auto& A = sa[tid];
    if (S.empty()) {
      S.assign(4 * T_, T(0));
      A.assign(T_, a.V);  // V: no column seen yet
      for (int64_t r = 0; r < T_; ++r) S[4 * r] = -std::numeric_limits<T>::infinity();
    }
    std::vector<T> L(BT * BV);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t vt = task / nrb, rb = task % nrb, v0 = vt * BV, r0 = rb * BT;
      const int64_t cols = std::min(BV, a.V - v0), rows = std::min(BT, T_ - r0);
      logits_tile<T>(X + r0 * d, rows, d, W, Bp, v0, cols, o, L.data());
      for (int64_t r = 0; r < rows; ++r) {
        T* l = L.data() + r * BV;
        T* s = S.data() + 4 * (r0 + r);
        const int64_t t = tg[r0 + r];
        if (t >= v0 && t < v0 + cols) s[2] = l[t - v0];
        s[3] += weighted_sum(l, cols, o.cw ? o.cw + v0 : nullptr);
        const T tm = row_max(l, cols);
        const int64_t ti = v0 + first_argmax(l, cols, tm);
        if (argmax_better(tm, ti, s[0], A[r0 + r])) A[r0 + r] = ti;
        const T mx = nan_max(tm, s[0]);  // NaN when a logit is NaN
        const T se = exp_row(l, cols, mx);
        s[1] = s[1] * std::exp(s[0] - mx) + se;  // s[0] = -inf at first: exp(-inf) = 0
        s[0] = mx;
      }
    }
  });
  T* lo = loss.data_ptr<T>();
  T* ls = lse.data_ptr<T>();
  int64_t* am = amax.data_ptr<int64_t>();
  at::parallel_for(0, T_, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T m = -std::numeric_limits<T>::infinity(), s = 0, zt = 0, sz = 0;
      T bv = -std::numeric_limits<T>::infinity();
      int64_t bi = a.V;
      for (size_t th = 0; th < st.size(); ++th) {
        const auto& S = st[th];
        if (S.empty()) continue;
        const T* q = S.data() + 4 * r;
        if (argmax_better(q[0], sa[th][r], bv, bi)) {
          bv = q[0];
          bi = sa[th][r];
        }
        if (q[0] == -std::numeric_limits<T>::infinity()) continue;
        const T mx = nan_max(q[0], m);
        s = s * std::exp(m - mx) + q[1] * std::exp(q[0] - mx);
        m = mx;
        zt += q[2];
        sz += q[3];
      }
      const T l = m + std::log(s);
      ls[r] = l;
      am[r] = bi < a.V ? bi : 0;  // every logit -inf: torch.argmax's 0
      if (tg[r] == o.ignore) {
        lo[r] = 0;
        continue;
      }
      lo[r] = o.row_loss(l, zt, sz, o.wt(tg[r]));
    }
  });
}

template <class T>
void bwd_impl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
              const at::Tensor& target, const at::Tensor& lse, const at::Tensor& cw, const CrossEntropyArgs& a,
              at::Tensor& dx, at::Tensor& dw, at::Tensor& db) {
  const Opts<T> o = make_opts<T>(a, cw);
  const T* X = x.data_ptr<T>();
  const T* W = w.data_ptr<T>();
  const T* Bp = a.has_bias ? b.data_ptr<T>() : nullptr;
  const T* G = g.data_ptr<T>();
  const T* LS = lse.data_ptr<T>();
  const int64_t* tg = target.data_ptr<int64_t>();
  T* DW = dw.data_ptr<T>();  // float32 (float64) accumulation whatever the input dtype
  T* DB = a.has_bias ? db.data_ptr<T>() : nullptr;
  const int64_t T_ = a.T, d = a.d, nvt = (a.V + BV - 1) / BV, nrb = (T_ + BT - 1) / BT;
  const int nth = at::get_num_threads();
  std::vector<at::Tensor> dx_parts(nth);
  const T filt = T(a.filter);
  std::vector<T> xcopy;
  const T* XW = x_for_dw(X, T_, d, tg, o.ignore, xcopy);  // x rows for dW
  at::parallel_for(0, nvt, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    if (!dx_parts[tid].defined()) dx_parts[tid] = at::zeros({T_, d}, dx.options());
    T* DX = dx_parts[tid].data_ptr<T>();
    std::vector<T> L(BT * BV), capd(BV);
    for (int64_t vt = begin; vt < end; ++vt) {
      const int64_t v0 = vt * BV, cols = std::min(BV, a.V - v0);
      for (int64_t rb = 0; rb < nrb; ++rb) {
        const int64_t r0 = rb * BT, rows = std::min(BT, T_ - r0);
        logits_tile<T>(X + r0 * d, rows, d, W, Bp, v0, cols, o, L.data());
        T amax = 0;
        for (int64_t r = 0; r < rows; ++r) {
          T* l = L.data() + r * BV;
          const int64_t t = tg[r0 + r];
          const T gr = G[r0 + r];
          if (t == o.ignore || gr == T(0)) {
            std::fill(l, l + cols, T(0));
            continue;
          }
          const T ls = LS[r0 + r];
          if (o.cap > 0)  // d(cap tanh(l / cap)) / dl = 1 - (z / cap)^2, from the capped logits
            for (int64_t c = 0; c < cols; ++c) capd[c] = T(1) - (l[c] / o.cap) * (l[c] / o.cap);
          exp_row(l, cols, ls);  // p = exp(z - lse), z <= lse
          const T w_t = o.wt(t);
          dlogits_row(l, cols, o.pscale(w_t) + T(2) * o.zl * ls, (t >= v0 && t < v0 + cols) ? t - v0 : int64_t(-1),
                      capd.data(), gr, o, o.cw ? o.cw + v0 : nullptr, w_t);
          if (filt > 0)  // a NaN d logit keeps the tile
            for (int64_t c = 0; c < cols; ++c) amax = nan_max(std::abs(l[c]), amax);
        }
        if (filt > 0 && amax < filt) continue;  // Cut Cross-Entropy's filter (opt-in)
        // dW_tile += dl^T x_blk ; dbias += colsum(dl) ; dx_blk += dl W_tile
        mm<T>(true, false, cols, d, rows, T(1), L.data(), BV, XW + r0 * d, d, T(1), DW + v0 * d, d);
        if (DB)
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < cols; ++c) DB[v0 + c] += L[r * BV + c];
        mm<T>(false, false, rows, d, cols, T(1), L.data(), BV, W + v0 * d, d, T(1), DX + r0 * d, d);
      }
    }
  });
  bool first = true;
  for (auto& p : dx_parts) {
    if (!p.defined()) continue;
    if (first) dx.copy_(p);
    else dx.add_(p);
    first = false;
  }
  if (first) dx.zero_();
  zero_ignored_rows(dx.data_ptr<T>(), T_, d, tg, o.ignore);
}

// Loss and gradients in one pass (per-row loss weights G known up front): per block of RB rows the
// full logits (RB x V, ~16 MiB) are formed once with one multi-threaded GEMM, each row's
// lse / loss is taken and the row is turned into d logits in place, then dx_blk = dl W and
// dW += dl^T x_blk (two more GEMMs). Three GEMMs of T x V x d in all instead of the four of
// forward + recomputing backward; peak extra memory RB x V, never T x V.
template <class T>
void fwd_bwd_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& target,
                  const at::Tensor& g, const at::Tensor& cw, const CrossEntropyArgs& a, bool wgrad, at::Tensor& loss,
                  at::Tensor& lse, at::Tensor& dx, at::Tensor& dw, at::Tensor& db, at::Tensor& amax) {
  const Opts<T> o = make_opts<T>(a, cw);
  int64_t* AM = amax.data_ptr<int64_t>();
  const T* X = x.data_ptr<T>();
  const T* W = w.data_ptr<T>();
  const T* Bp = a.has_bias ? b.data_ptr<T>() : nullptr;
  const T* G = g.data_ptr<T>();
  const int64_t* tg = target.data_ptr<int64_t>();
  T* LO = loss.data_ptr<T>();
  T* LS = lse.data_ptr<T>();
  T* DX = dx.data_ptr<T>();
  T* DW = wgrad ? dw.data_ptr<T>() : nullptr;  // weight_grad=False: no dW / dbias
  T* DB = a.has_bias && wgrad ? db.data_ptr<T>() : nullptr;
  const int64_t T_ = a.T, d = a.d, V = a.V;
  // LT_LCE_ROWS=n: tuning override of the row block (docs/tuning.md), read on first use; a value
  // that is not an integer in [1, 65536] is reported on stderr and the automatic choice is kept
  static const int64_t env_rb = [] {
    const char* e = std::getenv("LT_LCE_ROWS");
    if (!e) return int64_t(0);
    char* end = nullptr;
    const long long n = std::strtoll(e, &end, 10);
    while (end && *end == ' ') ++end;
    if (end != e && end && *end == '\0' && n >= 1 && n <= 65536) return int64_t(n);
    std::fprintf(stderr,
                 "longtune: ignoring LT_LCE_ROWS=\"%s\": expected an integer number of rows in [1, 65536] "
                 "(docs/tuning.md); using the automatic row block\n",
                 e);
    return int64_t(0);
  }();
  const int64_t RB = env_rb ? env_rb : std::clamp<int64_t>((int64_t(1) << 23) / std::max<int64_t>(V, 1), 16, 512);
  // a tensor, not a std::vector: the block's logits are the op's largest scratch and memory
  // trackers (the profiler's allocation events) should see them
  at::Tensor Lt = at::empty({std::min(RB, T_) * V}, x.options());
  T* const Lp = Lt.data_ptr<T>();
  std::vector<double> db64(DB ? V : 0, 0.0);
  std::vector<T> xcopy;
  const T* XW = DW ? x_for_dw(X, T_, d, tg, o.ignore, xcopy) : X;  // x rows for dW
  for (int64_t r0 = 0; r0 < T_; r0 += RB) {
    const int64_t rows = std::min(RB, T_ - r0);
    mm<T>(false, true, rows, V, d, T(1), X + r0 * d, d, W, d, T(0), Lp, V);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> capd(o.cap > 0 ? V : 0);
      for (int64_t r = begin; r < end; ++r) {
        T* l = Lp + r * V;
        if (Bp)
          for (int64_t c = 0; c < V; ++c) l[c] += Bp[c];
        if (o.cap > 0)
          for (int64_t c = 0; c < V; ++c) {
            l[c] = o.cap * std::tanh(l[c] / o.cap);
            capd[c] = T(1) - (l[c] / o.cap) * (l[c] / o.cap);  // d(cap tanh(l / cap)) / dl
          }
        const int64_t t = tg[r0 + r];
        const bool ignored = t == o.ignore;
        const T zt = ignored ? T(0) : l[t];
        const T sz = o.eps > 0 ? weighted_sum(l, V, o.cw) : T(0);
        const T mx = row_max(l, V);
        AM[r0 + r] = first_argmax(l, V, mx);
        const T se = exp_row(l, V, mx);  // l = exp(z - max)
        const T ls = mx + std::log(se);
        LS[r0 + r] = ls;
        const T w_t = ignored ? T(0) : o.wt(t);
        LO[r0 + r] = ignored ? T(0) : o.row_loss(ls, zt, sz, w_t);
        const T gr = G[r0 + r];
        if (ignored || gr == T(0)) {
          std::fill(l, l + V, T(0));
          continue;
        }
        dlogits_row(l, V, (o.pscale(w_t) + T(2) * o.zl * ls) / se, t, capd.data(), gr, o, o.cw, w_t);
      }
    });
    mm<T>(false, false, rows, d, V, T(1), Lp, V, W, d, T(0), DX + r0 * d, d);
    zero_ignored_rows(DX + r0 * d, rows, d, tg + r0, o.ignore);
    if (DW) mm<T>(true, false, V, d, rows, T(1), Lp, V, XW + r0 * d, d, T(1), DW, d);
    if (DB)  // column sums accumulated in double over all rows (a long fp32 running sum drifts)
      at::parallel_for(0, V, 4096, [&](int64_t c0, int64_t c1) {
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = c0; c < c1; ++c) db64[c] += Lp[r * V + c];
      });
  }
  if (DB)
    for (int64_t c = 0; c < V; ++c) DB[c] = T(db64[c]);
}

at::ScalarType ctype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x_, const at::Tensor& w_,
                                                   const std::optional<at::Tensor>& b_, const at::Tensor& target,
                                                   int64_t ignore_index, double eps, double z_loss, double softcap,
                                                   const std::optional<at::Tensor>& cw_) {
  const char* op = "linear_cross_entropy_fwd";
  CrossEntropyArgs a = check_args(op, x_, w_, b_, target, ignore_index, eps, z_loss, softcap, /*allow_f64=*/true);
  const auto ct = ctype(x_);
  const at::Tensor cw = check_class_weight(op, a, x_, cw_, ct);
  const at::Tensor x = x_.to(ct).contiguous(), w = w_.to(ct).contiguous();
  const at::Tensor b = b_.has_value() ? b_->to(ct).contiguous() : at::Tensor();
  const at::Tensor t = target.contiguous();
  at::Tensor loss = at::empty({a.T}, x.options()), lse = at::empty({a.T}, x.options());
  at::Tensor amax = at::empty({a.T}, target.options());
  if (a.T > 0) {
    if (ct == at::kDouble) fwd_impl<double>(x, w, b, t, cw, a, loss, lse, amax);
    else fwd_impl<float>(x, w, b, t, cw, a, loss, lse, amax);
  }
  return {loss, lse, amax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& g_, const at::Tensor& x_, const at::Tensor& w_,
                                                   const std::optional<at::Tensor>& b_, const at::Tensor& target,
                                                   const at::Tensor& lse_, int64_t ignore_index, double eps,
                                                   double z_loss, double softcap, double filter,
                                                   const std::optional<at::Tensor>& cw_) {
  const char* op = "linear_cross_entropy_bwd";
  CrossEntropyArgs a = check_args(op, x_, w_, b_, target, ignore_index, eps, z_loss, softcap, /*allow_f64=*/true);
  check_bwd(op, a, x_, g_, lse_, filter);
  a.filter = filter;
  const auto ct = ctype(x_);
  const at::Tensor cw = check_class_weight(op, a, x_, cw_, ct);
  const at::Tensor x = x_.to(ct).contiguous(), w = w_.to(ct).contiguous();
  const at::Tensor b = b_.has_value() ? b_->to(ct).contiguous() : at::Tensor();
  const at::Tensor g = g_.to(ct).contiguous(), lse = lse_.to(ct).contiguous(), t = target.contiguous();
  at::Tensor dx = at::empty({a.T, a.d}, x.options());
  at::Tensor dw = at::zeros({a.V, a.d}, x.options());
  at::Tensor db = a.has_bias ? at::zeros({a.V}, x.options()) : at::empty({0}, x_.options());
  if (a.T > 0) {
    if (ct == at::kDouble) bwd_impl<double>(g, x, w, b, t, lse, cw, a, dx, dw, db);
    else bwd_impl<float>(g, x, w, b, t, lse, cw, a, dx, dw, db);
  } else {
    dx.zero_();
  }
  return {dx.to(x_.scalar_type()), dw.to(w_.scalar_type()), a.has_bias ? db.to(b_->scalar_type()) : db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_bwd(
    const at::Tensor& x_, const at::Tensor& w_, const std::optional<at::Tensor>& b_, const at::Tensor& target,
    const at::Tensor& g_, int64_t ignore_index, double eps, double z_loss, double softcap, bool weight_grad,
    const std::optional<at::Tensor>& cw_, bool fp32_grads) {
  const char* op = "linear_cross_entropy_fwd_bwd";
  CrossEntropyArgs a = check_args(op, x_, w_, b_, target, ignore_index, eps, z_loss, softcap, /*allow_f64=*/true);
  check_fwd_bwd(op, a, x_, g_);
  const auto ct = ctype(x_);
  const at::Tensor cw = check_class_weight(op, a, x_, cw_, ct);
  const at::Tensor x = x_.to(ct).contiguous(), w = w_.to(ct).contiguous();
  const at::Tensor b = b_.has_value() ? b_->to(ct).contiguous() : at::Tensor();
  const at::Tensor g = g_.to(ct).contiguous(), t = target.contiguous();
  at::Tensor loss = at::empty({a.T}, x.options()), lse = at::empty({a.T}, x.options());
  at::Tensor dx = at::empty({a.T, a.d}, x.options());
  at::Tensor dw = weight_grad ? at::zeros({a.V, a.d}, x.options()) : at::empty({0}, x_.options());
  at::Tensor db = a.has_bias && weight_grad ? at::zeros({a.V}, x.options()) : at::empty({0}, x_.options());
  at::Tensor amax = at::empty({a.T}, target.options());
  if (a.T > 0) {
    if (ct == at::kDouble) fwd_bwd_impl<double>(x, w, b, t, g, cw, a, weight_grad, loss, lse, dx, dw, db, amax);
    else fwd_bwd_impl<float>(x, w, b, t, g, cw, a, weight_grad, loss, lse, dx, dw, db, amax);
  }
  if (fp32_grads) return {loss, lse, dx, dw, db, amax};  // the compute dtype, not rounded
  return {loss,
          lse,
          dx.to(x_.scalar_type()),
          weight_grad ? dw.to(w_.scalar_type()) : dw,
          a.has_bias && weight_grad ? db.to(b_->scalar_type()) : db,
          amax};
}

}  // namespace
}  // namespace lt::cross_entropy

TORCH_LIBRARY_IMPL(longtune, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &lt::cross_entropy::fwd);
  m.impl("linear_cross_entropy_bwd", &lt::cross_entropy::bwd);
  m.impl("linear_cross_entropy_fwd_bwd", &lt::cross_entropy::fwd_bwd);
}
