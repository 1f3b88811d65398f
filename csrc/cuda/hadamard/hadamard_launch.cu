// nvcc launch file: the only place the Hadamard kernels are launched with <<<...>>>.
// No torch headers here (build time); the bindings pass a plain params struct and a stream.
#include "cuda/common/cuda_launch.cuh"
#include "cuda/hadamard/hadamard_kernel.cuh"

namespace lt::hadamard {

template <class T, int E>
__global__ void __launch_bounds__(kBlockThreads) hadamard_kernel(KParams<T> p) {
  hadamard_body<T, E>(p);
}

const char* launch_hadamard_cuda(const HadamardParams& hp, void* stream) {
  const LaunchCfg cfg = launch_config(hp, kMaxGridX);
  cudaError_t err = cudaSuccess;
  dispatch(hp,
           [&]<class T, int E>() { err = launch_kernel(&hadamard_kernel<T, E>, cfg, stream, make_kparams<T>(hp)); });
  return launch_error(err);
}

}  // namespace lt::hadamard
