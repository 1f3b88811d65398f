// nvcc launch file of the sparse-delta kernels.
#include <cuda_runtime.h>

#include "cuda/sparse_delta/sparse_delta_kernel.cuh"

namespace lt::sparse_delta {

template <class T>
__global__ void __launch_bounds__(kGradThreads) grad_kernel(GradKParams<T> p) {
  grad_body<T>(p);
}

const char* launch_sparse_delta_grad_cuda(const GradParams& gp, void* stream) {
  const hadamard::LaunchCfg cfg = grad_launch_config(gp, int64_t(1) << 20);
  grad_dispatch(gp, [&]<class T>() {
    grad_kernel<T><<<dim3(cfg.grid.x), dim3(cfg.block.x), 0, static_cast<cudaStream_t>(stream)>>>(
        make_grad_kparams<T>(gp));
  });
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <class T>
__global__ void __launch_bounds__(kGradThreads) adamw_kernel(AdamWKParams<T> p) {
  adamw_body<T>(p);
}

const char* launch_sparse_adamw_cuda(const AdamWParams& ap, void* stream) {
  const hadamard::LaunchCfg cfg = adamw_launch_config(ap.n, int64_t(1) << 20);
  dtype_dispatch(ap.dtype, [&]<class T>() {
    adamw_kernel<T><<<dim3(cfg.grid.x), dim3(cfg.block.x), 0, static_cast<cudaStream_t>(stream)>>>(
        make_adamw_kparams<T>(ap));
  });
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace lt::sparse_delta
