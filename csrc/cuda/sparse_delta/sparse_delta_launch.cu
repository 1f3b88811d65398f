// nvcc launch file of the sparse-delta kernels.
#include "cuda/common/cuda_launch.cuh"
#include "cuda/sparse_delta/sparse_delta_kernel.cuh"

namespace lt::sparse_delta {

template <class T>
__global__ void __launch_bounds__(kGradThreads) grad_kernel(GradKParams<T> p) {
  grad_body<T>(p);
}

const char* launch_sparse_delta_grad_cuda(const GradParams& gp, void* stream) {
  const LaunchCfg cfg = grad_launch_config(gp, kMaxGridX);
  cudaError_t err = cudaSuccess;
  dispatch_dtype(gp.dtype,
                 [&]<class T>() { err = launch_kernel(&grad_kernel<T>, cfg, stream, make_grad_kparams<T>(gp)); });
  return launch_error(err);
}

template <class T>
__global__ void __launch_bounds__(kGradThreads) adamw_kernel(AdamWKParams<T> p) {
  adamw_body<T>(p);
}

const char* launch_sparse_adamw_cuda(const AdamWParams& ap, void* stream) {
  const LaunchCfg cfg = adamw_launch_config(ap.n, kMaxGridX);
  cudaError_t err = cudaSuccess;
  dispatch_dtype(ap.dtype,
                 [&]<class T>() { err = launch_kernel(&adamw_kernel<T>, cfg, stream, make_adamw_kparams<T>(ap)); });
  return launch_error(err);
}

}  // namespace lt::sparse_delta
