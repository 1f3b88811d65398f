// nvcc launch file of the fused linear + cross-entropy kernels.
#include <type_traits>

#include "cuda/common/cuda_launch.cuh"
#include "cuda/cross_entropy/cross_entropy_kernel.cuh"

namespace lt::cross_entropy {

template <class T>
__global__ void __launch_bounds__(kThreads) cross_entropy_fwd_kernel(FwdK<T> p) {
  fwd_body<T>(p);
}
template <class T>
__global__ void __launch_bounds__(kMergeThreads) cross_entropy_merge_kernel(FwdK<T> p) {
  merge_body<T>(p);
}
template <class T>
__global__ void __launch_bounds__(kThreads) cross_entropy_bwd_kernel(BwdK<T> p) {
  bwd_body<T>(p);
}
template <class T>
__global__ void __launch_bounds__(kThreads) cross_entropy_onepass_fwd_kernel(FwdK<T> p) {
  fwd_body<T, true>(p);
}
template <class T>
__global__ void __launch_bounds__(kThreads) cross_entropy_onepass_bwd_kernel(BwdK<T> p) {
  bwd_body<T, true>(p);
}
template <class T>
__global__ void __launch_bounds__(kConvThreads) cross_entropy_conv_kernel(ConvK<T> p) {
  conv_body<T>(p);
}

namespace {
template <class T>
cudaError_t convert(const float* in, void* out, int64_t n, void* stream) {
  if (n <= 0 || out == nullptr) return cudaSuccess;
  return launch_kernel(&cross_entropy_conv_kernel<T>, conv_config(n, kNoGridCap), stream,
                       make_conv<T>(in, out, n, "output"));
}
}  // namespace

const char* launch_cross_entropy_fwd_cuda(const FwdParams& fp, void* stream) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype(fp.dtype, [&]<class T>() {
    const FwdK<T> k = make_fwd<T>(fp);
    if ((err = launch_kernel(&cross_entropy_fwd_kernel<T>, fwd_config(fp, kNoGridCap), stream, k)) != cudaSuccess)
      return;
    err = launch_kernel(&cross_entropy_merge_kernel<T>, merge_config(fp.T, kNoGridCap), stream, k);
  });
  return launch_error(err);
}

const char* launch_cross_entropy_bwd_cuda(const BwdParams& bp, void* stream) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype(bp.dtype, [&]<class T>() {
    if ((err = launch_kernel(&cross_entropy_bwd_kernel<T>, bwd_config(bp, kNoGridCap), stream, make_bwd<T>(bp))) !=
        cudaSuccess)
      return;
    if constexpr (!std::is_same_v<T, float>) {
      if ((err = convert<T>(bp.dx32, bp.dx, bp.T * bp.d, stream)) != cudaSuccess) return;
      if ((err = convert<T>(bp.dw32, bp.dw, bp.V * bp.d, stream)) != cudaSuccess) return;
      if (bp.db32 != nullptr) err = convert<T>(bp.db32, bp.db, bp.V, stream);
    }
  });
  return launch_error(err);
}

const char* launch_cross_entropy_fwd_bwd_cuda(const OnePassParams& p, void* stream) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype(p.fwd.dtype, [&]<class T>() {
    for (int64_t r0 = 0; r0 < p.fwd.T; r0 += p.rows) {
      const auto [fp, bp] = onepass_chunk(p, r0, std::min(p.rows, p.fwd.T - r0));
      const FwdK<T> fk = make_fwd<T>(fp);
      if ((err = launch_kernel(&cross_entropy_onepass_fwd_kernel<T>, fwd_config(fp, kNoGridCap), stream, fk)) !=
          cudaSuccess)
        return;
      if ((err = launch_kernel(&cross_entropy_merge_kernel<T>, merge_config(fp.T, kNoGridCap), stream, fk)) !=
          cudaSuccess)
        return;
      if ((err = launch_kernel(&cross_entropy_onepass_bwd_kernel<T>, bwd_config(bp, kNoGridCap), stream,
                               make_bwd<T>(bp))) != cudaSuccess)
        return;
    }
    if constexpr (!std::is_same_v<T, float>) {
      const BwdParams& bp = p.bwd;
      if ((err = convert<T>(bp.dx32, bp.dx, bp.T * bp.d, stream)) != cudaSuccess) return;
      if ((err = convert<T>(bp.dw32, bp.dw, bp.V * bp.d, stream)) != cudaSuccess) return;
      err = convert<T>(bp.db32, bp.db, bp.V, stream);
    }
  });
  return launch_error(err);
}

}  // namespace lt::cross_entropy
