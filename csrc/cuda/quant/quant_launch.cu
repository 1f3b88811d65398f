// nvcc launch file of the rotated-quantization kernels.
#include "cuda/common/cuda_launch.cuh"
#include "cuda/quant/quant_kernel.cuh"

namespace lt::quant {

template <class T, int E>
__global__ void __launch_bounds__(hadamard::kBlockThreads) quant_kernel(QKParams<T> p) {
  quant_body<T, E>(p);
}

namespace {
template <class Params>
const char* launch(const Params& qp, void* stream) {
  const LaunchCfg cfg = quant_launch_config(qp, kMaxGridX);
  cudaError_t err = cudaSuccess;
  quant_dispatch(
      qp, [&]<class T, int E>() { err = launch_kernel(&quant_kernel<T, E>, cfg, stream, make_qkparams<T>(qp)); });
  return launch_error(err);
}
}  // namespace

const char* launch_quant_cuda(const QuantParams& qp, void* stream) { return launch(qp, stream); }
const char* launch_quant_bwd_cuda(const QuantBwdParams& bp, void* stream) { return launch(bp, stream); }

}  // namespace lt::quant
