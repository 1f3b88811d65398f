// Host-compiler backend of the intrinsics layer: every call goes to the CPU emulator (csrc/emu).
// Pointers are bounds-checked wrappers; shared-memory accesses also check cp.async completion.
#pragma once
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "emu/runtime.h"

namespace lt::simt {

// ------------------------------------------------------------------ checked global pointer
// Element access through a gptr to writable memory returns this proxy, so that reads and writes
// can be counted apart (emulator counters); through a gptr to const, a plain reference (a read).
template <class T>
struct gref {
  T* p;
  const char* name;
  const void* lo;  // the tensor's base (race reports give byte offsets from it)
  operator T() const {
    if (emu::counting()) emu::count_global(name, sizeof(T), false);
    if (emu::tracking()) emu::track_global(p, sizeof(T), emu::Access::Read, lo, name);
    return *p;
  }
  const gref& operator=(const T& v) const {
    if (emu::counting()) emu::count_global(name, sizeof(T), true);
    if (emu::tracking()) emu::track_global(p, sizeof(T), emu::Access::Write, lo, name);
    *p = v;
    return *this;
  }
  const gref& operator=(const gref& o) const { return *this = static_cast<T>(o); }
  template <class V>
  const gref& operator+=(const V& v) const {
    return *this = static_cast<T>(T(*this) + v);
  }
  template <class V>
  const gref& operator-=(const V& v) const {
    return *this = static_cast<T>(T(*this) - v);
  }
  template <class V>
  const gref& operator*=(const V& v) const {
    return *this = static_cast<T>(T(*this) * v);
  }
};

template <class T>
struct gptr {
  T* p = nullptr;
  const void* lo = nullptr;
  const void* hi = nullptr;
  const char* name = "?";
  using ref = std::conditional_t<std::is_const_v<T>, T&, gref<T>>;

  gptr() = default;
  gptr(T* p_, const void* lo_, const void* hi_, const char* n) : p(p_), lo(lo_), hi(hi_), name(n) {}
  template <class U, class = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  gptr(const gptr<U>& o) : p(o.p), lo(o.lo), hi(o.hi), name(o.name) {}

  ref operator[](int64_t i) const {
    emu::check_global(p + i, sizeof(T), lo, hi, name);
    if constexpr (std::is_const_v<T>) {
      if (emu::counting()) emu::count_global(name, sizeof(T), false);
      if (emu::tracking()) emu::track_global(p + i, sizeof(T), emu::Access::Read, lo, name);
      return p[i];
    } else {
      return gref<T>{p + i, name, lo};
    }
  }
  ref operator*() const { return (*this)[0]; }
  gptr operator+(int64_t i) const {
    gptr r = *this;
    r.p += i;
    return r;
  }
  gptr& operator+=(int64_t i) {
    p += i;
    return *this;
  }
  explicit operator bool() const { return p != nullptr; }
};
template <class T>
gptr<T> make_gptr(T* p, int64_t count, const char* name) {
  return gptr<T>(p, p, p + (count > 0 ? count : 0), name);
}
template <class T>
T* raw(const gptr<T>& g) {
  return g.p;
}

// ------------------------------------------------------------------ checked shared pointer
template <class T>
struct sref {  // proxy so that reads and writes are checked separately (cp.async tracking)
  T* p;
  operator T() const {
    emu::check_smem(p, sizeof(T), false);
    return *p;
  }
  template <class U = T, class = std::enable_if_t<!std::is_const_v<U>>>
  const sref& operator=(const T& v) const {
    emu::check_smem(p, sizeof(T), true);
    *p = v;
    return *this;
  }
  const sref& operator=(const sref& o) const { return *this = static_cast<T>(o); }
  template <class V>
  const sref& operator+=(const V& v) const {
    return *this = static_cast<T>(T(*this) + v);
  }
  template <class V>
  const sref& operator-=(const V& v) const {
    return *this = static_cast<T>(T(*this) - v);
  }
  template <class V>
  const sref& operator*=(const V& v) const {
    return *this = static_cast<T>(T(*this) * v);
  }
};
template <class T>
struct sptr {
  T* p = nullptr;
  sptr() = default;
  explicit sptr(T* p_) : p(p_) {}
  template <class U, class = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  sptr(const sptr<U>& o) : p(o.p) {}
  sref<T> operator[](int64_t i) const { return sref<T>{p + i}; }
  sref<T> operator*() const { return sref<T>{p}; }
  sptr operator+(int64_t i) const { return sptr(p + i); }
  sptr& operator+=(int64_t i) {
    p += i;
    return *this;
  }
};
template <class T>
T* raw(const sptr<T>& s) {
  return s.p;
}

template <class T>
sptr<T> dynamic_smem() {
  return sptr<T>(reinterpret_cast<T*>(emu::smem_base()));
}

// ------------------------------------------------------------------ indices and barriers
inline Dim3 thread_idx() { return emu::thread_idx(); }
inline Dim3 block_idx() { return emu::block_idx(); }
inline Dim3 block_dim() { return emu::block_dim(); }
inline Dim3 grid_dim() { return emu::grid_dim(); }
inline uint32_t thread_linear() { return emu::thread_linear(); }
inline void sync_block() { emu::sync_block(); }

namespace detail {
enum : uint64_t {
  kSyncWarp = 1,
  kShfl = 2,
  kShflXor = 3,
  kShflUp = 4,
  kShflDown = 5,
  kVote = 6,
  kLdm1 = 7,
  kLdm2 = 8,
  kLdm4 = 9,
  kMma16816F16 = 10,
  kMma16816BF16 = 11,
  kMma1688F16 = 12
};
void shfl_fn(const emu::LaneIO* in, emu::LaneIO* out, uint32_t mask, uint32_t lanes);
void vote_fn(const emu::LaneIO* in, emu::LaneIO* out, uint32_t mask, uint32_t lanes);
void nop_fn(const emu::LaneIO* in, emu::LaneIO* out, uint32_t mask, uint32_t lanes);
void ldmatrix_fn(const emu::LaneIO* in, emu::LaneIO* out, uint32_t mask, uint32_t lanes);
void mma16816_f16_fn(const emu::LaneIO* in, emu::LaneIO* out, uint32_t mask, uint32_t lanes);
void mma16816_bf16_fn(const emu::LaneIO* in, emu::LaneIO* out, uint32_t mask, uint32_t lanes);
void mma1688_f16_fn(const emu::LaneIO* in, emu::LaneIO* out, uint32_t mask, uint32_t lanes);

template <class T>
T shfl_any(uint64_t kind, const char* op, uint32_t mask, T v, int64_t arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 64 bits");
  emu::LaneIO in, out;
  std::memcpy(&in.w[0], &v, sizeof(T));
  in.w[1] = static_cast<uint64_t>(arg);
  in.w[2] = kind;
  in.w[3] = static_cast<uint64_t>(width);
  emu::warp_collective(op, kind | (uint64_t(uint32_t(width)) << 8), mask, in, out, &shfl_fn);
  T r;
  std::memcpy(&r, &out.w[0], sizeof(T));
  return r;
}
}  // namespace detail

inline void sync_warp(uint32_t mask) {
  emu::LaneIO in, out;
  emu::warp_collective("sync_warp", detail::kSyncWarp, mask, in, out, &detail::nop_fn);
}
template <class T>
T shfl(uint32_t mask, T v, int src, int width = 32) {
  return detail::shfl_any(detail::kShfl, "shfl", mask, v, src, width);
}
template <class T>
T shfl_xor(uint32_t mask, T v, int lane_mask, int width = 32) {
  return detail::shfl_any(detail::kShflXor, "shfl_xor", mask, v, lane_mask, width);
}
template <class T>
T shfl_up(uint32_t mask, T v, unsigned delta, int width = 32) {
  return detail::shfl_any(detail::kShflUp, "shfl_up", mask, v, delta, width);
}
template <class T>
T shfl_down(uint32_t mask, T v, unsigned delta, int width = 32) {
  return detail::shfl_any(detail::kShflDown, "shfl_down", mask, v, delta, width);
}
inline uint32_t ballot(uint32_t mask, bool pred) {
  emu::LaneIO in, out;
  in.w[0] = pred ? 1 : 0;
  emu::warp_collective("vote", detail::kVote, mask, in, out, &detail::vote_fn);
  return static_cast<uint32_t>(out.w[0]);
}
inline bool any(uint32_t mask, bool pred) { return ballot(mask, pred) != 0; }
inline bool all(uint32_t mask, bool pred) { return ballot(mask, pred) == mask; }

// ------------------------------------------------------------------ atomics
namespace detail {
// The bounds-checked element of an atomic read-modify-write (counted as one read and one write).
template <class T>
T& atomic_target(const gptr<T>& p) {
  emu::check_global(p.p, sizeof(T), p.lo, p.hi, p.name);
  if (emu::counting()) {
    emu::count_global(p.name, sizeof(T), false);
    emu::count_global(p.name, sizeof(T), true);
  }
  if (emu::tracking()) emu::track_global(p.p, sizeof(T), emu::Access::Atomic, p.lo, p.name);
  return *p.p;
}
}  // namespace detail
template <class T>
T atomic_add(const gptr<T>& p, T v) {
  return std::atomic_ref<T>(detail::atomic_target(p)).fetch_add(v);
}
template <class T>
T atomic_max(const gptr<T>& p, T v) {
  std::atomic_ref<T> a(detail::atomic_target(p));
  T cur = a.load();
  while (cur < v && !a.compare_exchange_weak(cur, v)) {}
  return cur;
}
template <class T>
T atomic_cas(const gptr<T>& p, T cmp, T v) {
  std::atomic_ref<T>(detail::atomic_target(p)).compare_exchange_strong(cmp, v);
  return cmp;
}

// ------------------------------------------------------------------ cp.async
template <class T>
void cp_async_16(sptr<T> dst, gptr<const T> src) {
  emu::check_align(dst.p, 16, "cp.async shared destination");
  emu::check_align(src.p, 16, "cp.async global source");
  emu::check_global(src.p, 16, src.lo, src.hi, src.name);
  if (emu::counting()) emu::count_global(src.name, 16, false);
  if (emu::tracking()) emu::track_global(src.p, 16, emu::Access::Read, src.lo, src.name);
  emu::cp_async(dst.p, src.p, 16);
}
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
void cp_async_wait() {
  emu::cp_async_wait(N);
}

// ------------------------------------------------------------------ ldmatrix
namespace detail {
template <int NMAT, bool Trans, class T>
void ldmatrix(uint32_t* r, sptr<T> row) {
  const uint32_t lane = thread_linear() & 31u;
  emu::LaneIO in, out;
  if (lane < 8u * NMAT) {  // only these lanes' addresses are used (PTX ISA, ldmatrix)
    emu::check_align(row.p, 16, "ldmatrix row address");
    emu::check_smem(row.p, 16, false);
  }
  in.w[0] = reinterpret_cast<uint64_t>(row.p);
  in.w[1] = NMAT;
  in.w[2] = Trans ? 1 : 0;
  const uint64_t key = (NMAT == 1 ? kLdm1 : NMAT == 2 ? kLdm2 : kLdm4) | (Trans ? 0x100u : 0u);
  emu::warp_collective("ldmatrix", key, 0xffffffffu, in, out, &ldmatrix_fn);
  for (int i = 0; i < NMAT; ++i) r[i] = static_cast<uint32_t>(out.w[i]);
}
}  // namespace detail
template <bool Trans = false, class T>
void ldmatrix_x1(uint32_t (&r)[1], sptr<T> row) {
  detail::ldmatrix<1, Trans>(r, row);
}
template <bool Trans = false, class T>
void ldmatrix_x2(uint32_t (&r)[2], sptr<T> row) {
  detail::ldmatrix<2, Trans>(r, row);
}
template <bool Trans = false, class T>
void ldmatrix_x4(uint32_t (&r)[4], sptr<T> row) {
  detail::ldmatrix<4, Trans>(r, row);
}

// ------------------------------------------------------------------ mma.sync
namespace detail {
inline void mma_call(const char* op, uint64_t key, emu::WarpFn fn, float* d, const uint32_t* a, int na,
                     const uint32_t* b, int nb, const float* c) {
  emu::LaneIO in, out;
  uint32_t* w = reinterpret_cast<uint32_t*>(in.w);
  for (int i = 0; i < na; ++i) w[i] = a[i];
  for (int i = 0; i < nb; ++i) w[4 + i] = b[i];
  std::memcpy(w + 6, c, 16);
  emu::warp_collective(op, key, 0xffffffffu, in, out, fn);
  std::memcpy(d, out.w, 16);
}
}  // namespace detail
inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  detail::mma_call("mma.m16n8k16.f16", detail::kMma16816F16, &detail::mma16816_f16_fn, d, a, 4, b, 2, c);
}
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  detail::mma_call("mma.m16n8k16.bf16", detail::kMma16816BF16, &detail::mma16816_bf16_fn, d, a, 4, b, 2, c);
}
inline void mma_m16n8k8_f16(float (&d)[4], const uint32_t (&a)[2], const uint32_t (&b)[1], const float (&c)[4]) {
  detail::mma_call("mma.m16n8k8.f16", detail::kMma1688F16, &detail::mma1688_f16_fn, d, a, 2, b, 1, c);
}

// ------------------------------------------------------------------ vector loads / stores
template <int E, class T>
void ld_vec(gptr<const T> p, int64_t i, T (&out)[E]) {
  constexpr size_t B = E * sizeof(T);
  emu::check_align(p.p + i, B >= 16 ? 16 : B, "vector load from global memory");
  emu::check_global(p.p + i, B, p.lo, p.hi, p.name);
  if (emu::counting()) emu::count_global(p.name, B, false);
  if (emu::tracking()) emu::track_global(p.p + i, B, emu::Access::Read, p.lo, p.name);
  std::memcpy(out, p.p + i, B);
}
template <int E, class T>
void ld_vec(gptr<T> p, int64_t i, T (&out)[E]) {
  ld_vec<E>(gptr<const T>(p), i, out);
}
template <int E, class T>
void st_vec(gptr<T> p, int64_t i, const T (&v)[E]) {
  constexpr size_t B = E * sizeof(T);
  emu::check_align(p.p + i, B >= 16 ? 16 : B, "vector store to global memory");
  emu::check_global(p.p + i, B, p.lo, p.hi, p.name);
  if (emu::counting()) emu::count_global(p.name, B, true);
  if (emu::tracking()) emu::track_global(p.p + i, B, emu::Access::Write, p.lo, p.name);
  std::memcpy(p.p + i, v, B);
}
template <int E, class T>
void ld_vec(sptr<T> p, int64_t i, std::remove_const_t<T> (&out)[E]) {
  constexpr size_t B = E * sizeof(T);
  emu::check_align(p.p + i, B >= 16 ? 16 : B, "vector load from shared memory");
  emu::check_smem(p.p + i, B, false);
  std::memcpy(out, p.p + i, B);
}
template <int E, class T>
void st_vec(sptr<T> p, int64_t i, const T (&v)[E]) {
  constexpr size_t B = E * sizeof(T);
  emu::check_align(p.p + i, B >= 16 ? 16 : B, "vector store to shared memory");
  emu::check_smem(p.p + i, B, true);
  std::memcpy(p.p + i, v, B);
}

}  // namespace lt::simt
