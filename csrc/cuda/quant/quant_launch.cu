// nvcc launch file of the rotated-quantization kernels.
#include <cuda_runtime.h>

#include "cuda/quant/quant_kernel.cuh"

namespace lt::quant {

template <class T, int E>
__global__ void __launch_bounds__(hadamard::kBlockThreads) quant_kernel(QKParams<T> p) {
  quant_body<T, E>(p);
}

const char* launch_quant_cuda(const QuantParams& qp, void* stream) {
  const hadamard::LaunchCfg cfg = quant_launch_config(qp, int64_t(1) << 20);
  cudaError_t err = cudaSuccess;
  quant_dispatch(qp, [&]<class T, int E>() {
    auto* kernel = &quant_kernel<T, E>;
    if (cfg.smem > 48 * 1024) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(cfg.smem));
      if (err != cudaSuccess) return;
    }
    kernel<<<dim3(cfg.grid.x), dim3(cfg.block.x), cfg.smem, static_cast<cudaStream_t>(stream)>>>(make_qkparams<T>(qp));
    err = cudaGetLastError();
  });
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace lt::quant
