// nvcc-only launch templates of the attention kernels; instantiated per head dim of
// LT_ATTN_HEAD_DIMS (attn_head_dims.h) by attn_{fwd,bwd}_hd<D>.cu (small translation units that
// CMakeLists.txt generates from attn_inst.cu.in) and dispatched by attn_launch.cu.
#pragma once
#include <cuda_runtime.h>

#include "cuda/attention/attn_kernel.cuh"

namespace lt::attn {

template <class T, int D, bool Cap>
__global__ void __launch_bounds__(AttnShape<D>::kFwdThreads) attn_fwd_kernel(AKParams<T> p) {
  attn_fwd_body<T, D, Cap>(p);
}
// k{Fwd,Bwd}OneBlockPerSm: declares 1 block per SM as the minimum, so that ptxas may use up to 255
// registers per thread (otherwise it may aim at fewer, for occupancy, and spill)
template <class T, int D, bool Cap>
__global__ void __launch_bounds__(AttnShape<D>::kFwdThreads, 1) attn_fwd_kernel_1(AKParams<T> p) {
  attn_fwd_body<T, D, Cap>(p);
}
template <class T, int D>
__global__ void __launch_bounds__(kThreads) attn_dsum_kernel(AKParams<T> p) {
  attn_dsum_body<T, D>(p);
}
template <class T, int D, bool Cap>
__global__ void __launch_bounds__(AttnShape<D>::kBwdThreads) attn_bwd_kernel(AKParams<T> p) {
  attn_bwd_body<T, D, Cap>(p);
}
template <class T, int D, bool Cap>
__global__ void __launch_bounds__(AttnShape<D>::kBwdThreads, 1) attn_bwd_kernel_1(AKParams<T> p) {
  attn_bwd_body<T, D, Cap>(p);
}
template <class T, int D>
__global__ void __launch_bounds__(kThreads) attn_dq_convert_kernel(AKParams<T> p) {
  attn_dq_convert_body<T, D>(p);
}

inline dim3 attn_grid(int64_t tiles_len, const AttnFwdParams& s, int32_t heads, int64_t tile) {
  return dim3(static_cast<unsigned>((tiles_len + tile - 1) / tile), static_cast<unsigned>(heads),
              static_cast<unsigned>(s.batch));
}
inline dim3 flat_grid(int64_t n) { return dim3(static_cast<unsigned>((n + kThreads - 1) / kThreads)); }

template <class K>
cudaError_t set_smem(K* kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

template <int D>
const char* launch_attn_fwd_d(const AttnFwdParams& s, void* stream) {
  cudaError_t err = cudaSuccess;
  auto run = [&]<class T>() {
    void (*kernel)(AKParams<T>);
    if constexpr (AttnShape<D>::kFwdOneBlockPerSm)
      kernel = s.softcap > 0.f ? &attn_fwd_kernel_1<T, D, true> : &attn_fwd_kernel_1<T, D, false>;
    else kernel = s.softcap > 0.f ? &attn_fwd_kernel<T, D, true> : &attn_fwd_kernel<T, D, false>;
    const size_t smem = AttnShape<D>::kFwdSmem;
    if ((err = set_smem(kernel, smem)) != cudaSuccess) return;
    kernel<<<attn_grid(s.nq, s, s.hm.heads, AttnShape<D>::kFwdBQ), AttnShape<D>::kFwdThreads, smem,
             static_cast<cudaStream_t>(stream)>>>(make_akparams<T>(s));
    err = cudaGetLastError();
  };
  if (s.dtype == DType::BF16) run.template operator()<simt::bf16>();
  else run.template operator()<simt::f16>();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <int D>
const char* launch_attn_bwd_d(const AttnBwdParams& s, void* stream) {
  cudaError_t err = cudaSuccess;
  auto run = [&]<class T>() {
    const auto st = static_cast<cudaStream_t>(stream);
    const AKParams<T> p = make_akparams<T>(s);
    attn_dsum_kernel<T, D><<<flat_grid(s.total_q * s.hm.heads), kThreads, 0, st>>>(p);
    if ((err = cudaGetLastError()) != cudaSuccess) return;
    void (*kernel)(AKParams<T>);
    if constexpr (AttnShape<D>::kBwdOneBlockPerSm)
      kernel = s.softcap > 0.f ? &attn_bwd_kernel_1<T, D, true> : &attn_bwd_kernel_1<T, D, false>;
    else kernel = s.softcap > 0.f ? &attn_bwd_kernel<T, D, true> : &attn_bwd_kernel<T, D, false>;
    const size_t smem = AttnShape<D>::kBwdSmem;
    if ((err = set_smem(kernel, smem)) != cudaSuccess) return;
    kernel<<<attn_grid(s.nk, s, s.hm.hkv, AttnShape<D>::kBwdBK), AttnShape<D>::kBwdThreads, smem, st>>>(p);
    if ((err = cudaGetLastError()) != cudaSuccess) return;
    attn_dq_convert_kernel<T, D><<<flat_grid(s.total_q * s.hm.hq * D / 8), kThreads, 0, st>>>(p);
    err = cudaGetLastError();
  };
  if (s.dtype == DType::BF16) run.template operator()<simt::bf16>();
  else run.template operator()<simt::f16>();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

#define LT_ATTN_EXTERN(D)                                                        \
  extern template const char* launch_attn_fwd_d<D>(const AttnFwdParams&, void*); \
  extern template const char* launch_attn_bwd_d<D>(const AttnBwdParams&, void*);
LT_ATTN_HEAD_DIMS(LT_ATTN_EXTERN)
#undef LT_ATTN_EXTERN

}  // namespace lt::attn
