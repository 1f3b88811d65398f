// nvcc backend of the intrinsics layer: thin inline wrappers over CUDA built-ins and inline PTX.
// Everything here compiles away; pointer wrappers are raw pointers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace lt::simt {

template <class T>
using gptr = T*;
template <class T>
using sptr = T*;

// Launchers wrap raw tensor pointers; `count` / `name` are used by the emulator's bounds checks.
template <class T>
__host__ __device__ inline gptr<T> make_gptr(T* p, int64_t /*count*/, const char* /*name*/) {
  return p;
}
template <class T>
LT_HD T* raw(T* p) {
  return p;
}

LT_DEV Dim3 thread_idx() { return {threadIdx.x, threadIdx.y, threadIdx.z}; }
LT_DEV Dim3 block_idx() { return {blockIdx.x, blockIdx.y, blockIdx.z}; }
LT_DEV Dim3 block_dim() { return {blockDim.x, blockDim.y, blockDim.z}; }
LT_DEV Dim3 grid_dim() { return {gridDim.x, gridDim.y, gridDim.z}; }
LT_DEV uint32_t thread_linear() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

LT_DEV void sync_block() { __syncthreads(); }
LT_DEV void sync_warp(uint32_t mask) { __syncwarp(mask); }

template <class T>
LT_DEV T shfl(uint32_t mask, T v, int src, int width = 32) {
  return __shfl_sync(mask, v, src, width);
}
template <class T>
LT_DEV T shfl_xor(uint32_t mask, T v, int lane_mask, int width = 32) {
  return __shfl_xor_sync(mask, v, lane_mask, width);
}
template <class T>
LT_DEV T shfl_up(uint32_t mask, T v, unsigned delta, int width = 32) {
  return __shfl_up_sync(mask, v, delta, width);
}
template <class T>
LT_DEV T shfl_down(uint32_t mask, T v, unsigned delta, int width = 32) {
  return __shfl_down_sync(mask, v, delta, width);
}
LT_DEV uint32_t ballot(uint32_t mask, bool pred) { return __ballot_sync(mask, pred); }
LT_DEV bool any(uint32_t mask, bool pred) { return __any_sync(mask, pred); }
LT_DEV bool all(uint32_t mask, bool pred) { return __all_sync(mask, pred); }

template <class T>
LT_DEV T atomic_add(T* p, T v) {
  return atomicAdd(p, v);
}
template <class T>
LT_DEV T atomic_max(T* p, T v) {
  return atomicMax(p, v);
}
template <class T>
LT_DEV T atomic_cas(T* p, T cmp, T v) {
  return atomicCAS(p, cmp, v);
}

template <class T>
LT_DEV sptr<T> dynamic_smem() {
  extern __shared__ __align__(16) unsigned char lt_dynamic_smem[];
  return reinterpret_cast<T*>(lt_dynamic_smem);
}

LT_DEV uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// ---- cp.async (sm_80+): 16-byte global -> shared copies in commit groups
template <class T>
LT_DEV void cp_async_16(sptr<T> dst, gptr<const T> src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
LT_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
LT_DEV void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- ldmatrix: 8x8 b16 matrices from shared memory; each lane gives one row address
template <bool Trans = false, class T>
LT_DEV void ldmatrix_x1(uint32_t (&r)[1], sptr<T> row) {
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)));
  else asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)));
}
template <bool Trans = false, class T>
LT_DEV void ldmatrix_x2(uint32_t (&r)[2], sptr<T> row) {
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(row)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(row)));
}
template <bool Trans = false, class T>
LT_DEV void ldmatrix_x4(uint32_t (&r)[4], sptr<T> row) {
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

// ---- tensor-core mma.sync (row.col, f32 accumulate)
LT_DEV void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
LT_DEV void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
LT_DEV void mma_m16n8k8_f16(float (&d)[4], const uint32_t (&a)[2], const uint32_t (&b)[1], const float (&c)[4]) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\n"
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// ---- vectorised (up to 128-bit) loads / stores of E contiguous elements; caller guarantees
// alignment to min(16, E * sizeof(T)) bytes.
namespace detail {
template <int B>
struct Vec;
template <>
struct Vec<16> {
  using type = uint4;
};
template <>
struct Vec<8> {
  using type = uint2;
};
template <>
struct Vec<4> {
  using type = uint32_t;
};
template <>
struct Vec<2> {
  using type = uint16_t;
};
}  // namespace detail

template <int E, class T, class P>
LT_DEV void ld_vec(P p, int64_t i, T (&out)[E]) {
  constexpr int B = E * int(sizeof(T));
  constexpr int C = B >= 16 ? 16 : B;
  using V = typename detail::Vec<C>::type;
  const V* src = reinterpret_cast<const V*>(p + i);
  V* dst = reinterpret_cast<V*>(out);
  LT_UNROLL for (int k = 0; k < B / C; ++k) dst[k] = src[k];
}
template <int E, class T, class P> LT_DEV void st_vec(P p, int64_t i, const T (&v)[E]) {
  constexpr int B = E * int(sizeof(T));
  constexpr int C = B >= 16 ? 16 : B;
  using V = typename detail::Vec<C>::type;
  V* dst = reinterpret_cast<V*>(p + i);
  const V* src = reinterpret_cast<const V*>(v);
  LT_UNROLL for (int k = 0; k < B / C; ++k) dst[k] = src[k];
}

}  // namespace lt::simt
