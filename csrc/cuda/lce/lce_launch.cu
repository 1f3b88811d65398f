// nvcc launch file of the fused linear + cross-entropy kernels.
#include <cuda_runtime.h>

#include <type_traits>

#include "cuda/lce/lce_kernel.cuh"

namespace lt::lce {

template <class T>
__global__ void __launch_bounds__(kThreads) lce_fwd_kernel(FwdK<T> p) { fwd_body<T>(p); }
template <class T>
__global__ void __launch_bounds__(kMergeThreads) lce_merge_kernel(FwdK<T> p) { merge_body<T>(p); }
template <class T>
__global__ void __launch_bounds__(kThreads) lce_bwd_kernel(BwdK<T> p) { bwd_body<T>(p); }
template <class T>
__global__ void __launch_bounds__(kConvThreads) lce_conv_kernel(ConvK<T> p) { conv_body<T>(p); }

namespace {
dim3 d3(const simt::Dim3& v) { return dim3(v.x, v.y, v.z); }

template <class T>
void convert(const float* in, void* out, int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  const Grid g = conv_config(n);
  lce_conv_kernel<T><<<d3(g.grid), d3(g.block), 0, s>>>(make_conv<T>(in, out, n, "output"));
}
}  // namespace

const char* launch_lce_fwd_cuda(const FwdParams& fp, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  dtype_dispatch(fp.dtype, [&]<class T>() {
    const FwdK<T> k = make_fwd<T>(fp);
    const Grid g = fwd_config(fp), m = merge_config(fp.T);
    lce_fwd_kernel<T><<<d3(g.grid), d3(g.block), kSmemBytes, s>>>(k);
    lce_merge_kernel<T><<<d3(m.grid), d3(m.block), 0, s>>>(k);
  });
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* launch_lce_bwd_cuda(const BwdParams& bp, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  dtype_dispatch(bp.dtype, [&]<class T>() {
    const Grid g = bwd_config(bp);
    lce_bwd_kernel<T><<<d3(g.grid), d3(g.block), kSmemBytes, s>>>(make_bwd<T>(bp));
    if constexpr (!std::is_same_v<T, float>) {
      convert<T>(bp.dx32, bp.dx, bp.T * bp.d, s);
      convert<T>(bp.dw32, bp.dw, bp.V * bp.d, s);
      if (bp.db32 != nullptr) convert<T>(bp.db32, bp.db, bp.V, s);
    }
  });
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace lt::lce
