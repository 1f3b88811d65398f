// nvcc launch file: the only place the Hadamard kernels are launched with <<<...>>>.
// No torch headers here (build time); the bindings pass a plain params struct and a stream.
#include <cuda_runtime.h>

#include "cuda/hadamard/hadamard_kernel.cuh"

namespace lt::hadamard {

template <class T, int E>
__global__ void __launch_bounds__(kBlockThreads) hadamard_kernel(KParams<T> p) {
  hadamard_body<T, E>(p);
}

const char* launch_hadamard_cuda(const HadamardParams& hp, void* stream) {
  const LaunchCfg cfg = launch_config(hp, /*max_grid=*/int64_t(1) << 20);
  cudaError_t err = cudaSuccess;
  dispatch(hp, [&]<class T, int E>() {
    auto* kernel = &hadamard_kernel<T, E>;
    if (cfg.smem > 48 * 1024) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(cfg.smem));
      if (err != cudaSuccess) return;
    }
    kernel<<<dim3(cfg.grid.x, cfg.grid.y, cfg.grid.z), dim3(cfg.block.x, cfg.block.y, cfg.block.z), cfg.smem,
             static_cast<cudaStream_t>(stream)>>>(make_kparams<T>(hp));
    err = cudaGetLastError();
  });
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace lt::hadamard
