// CUDA registration of longtune::hadamard_transform{,_backward}: validates, picks the stream,
// calls the nvcc-compiled launcher.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/common/cuda_glue.h"
#include "cuda/hadamard/hadamard_device_op.h"

namespace lt::hadamard {
namespace {

at::Tensor run_cuda(const char* op, const at::Tensor& x, double scale, bool transpose) {
  const c10::cuda::CUDAGuard guard(x.device());
  return run_device_op(op, x, scale, transpose, cuda_launcher(op, launch_hadamard_cuda));
}

at::Tensor fwd(const at::Tensor& x, double scale) { return run_cuda("hadamard_transform", x, scale, false); }
at::Tensor bwd(const at::Tensor& g, double scale) { return run_cuda("hadamard_transform_backward", g, scale, true); }

}  // namespace
}  // namespace lt::hadamard

TORCH_LIBRARY_IMPL(longtune, CUDA, m) {
  m.impl("hadamard_transform", &lt::hadamard::fwd);
  m.impl("hadamard_transform_backward", &lt::hadamard::bwd);
}
