// CUDA registration of the fused linear + cross-entropy ops.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/common/cuda_glue.h"
#include "cuda/lce/lce_device_op.h"

namespace lt::lce {
namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& b, const at::Tensor& target,
                                                   int64_t ignore_index, double eps, double z_loss, double softcap,
                                                   const std::optional<at::Tensor>& cw) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lce_fwd_device(x, w, b, target, ignore_index, eps, z_loss, softcap, cw,
                        cuda_launcher("linear_cross_entropy_fwd", launch_lce_fwd_cuda));
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& b, const at::Tensor& target,
                                                   const at::Tensor& lse, int64_t ignore_index, double eps,
                                                   double z_loss, double softcap, double filter,
                                                   const std::optional<at::Tensor>& cw) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lce_bwd_device(g, x, w, b, target, lse, ignore_index, eps, z_loss, softcap, filter, cw,
                        cuda_launcher("linear_cross_entropy_bwd", launch_lce_bwd_cuda));
}
}  // namespace
}  // namespace lt::lce

TORCH_LIBRARY_IMPL(longtune, CUDA, m) {
  m.impl("linear_cross_entropy_fwd", &lt::lce::fwd);
  m.impl("linear_cross_entropy_bwd", &lt::lce::bwd);
  m.impl("linear_cross_entropy_fwd_bwd", (&lt::lce::lce_fwd_bwd_composed<&lt::lce::fwd, &lt::lce::bwd>));
}
