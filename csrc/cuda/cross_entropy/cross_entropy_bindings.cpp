// CUDA registration of the fused linear + cross-entropy ops.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/common/cuda_glue.h"
#include "cuda/cross_entropy/cross_entropy_device_op.h"

namespace lt::cross_entropy {
namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& b, const at::Tensor& target,
                                                   int64_t ignore_index, double eps, double z_loss, double softcap,
                                                   const std::optional<at::Tensor>& cw) {
  const c10::cuda::CUDAGuard guard(x.device());
  return cross_entropy_fwd_device(x, w, b, target, ignore_index, eps, z_loss, softcap, cw,
                                  cuda_launcher("linear_cross_entropy_fwd", launch_cross_entropy_fwd_cuda));
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& b, const at::Tensor& target,
                                                   const at::Tensor& lse, int64_t ignore_index, double eps,
                                                   double z_loss, double softcap, double filter,
                                                   const std::optional<at::Tensor>& cw) {
  const c10::cuda::CUDAGuard guard(x.device());
  return cross_entropy_bwd_device(g, x, w, b, target, lse, ignore_index, eps, z_loss, softcap, filter, cw,
                                  cuda_launcher("linear_cross_entropy_bwd", launch_cross_entropy_bwd_cuda));
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_bwd(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, const at::Tensor& target,
    const at::Tensor& grad_rows, int64_t ignore_index, double eps, double z_loss, double softcap, bool weight_grad,
    const std::optional<at::Tensor>& cw, bool fp32_grads) {
  const c10::cuda::CUDAGuard guard(x.device());
  return cross_entropy_fwd_bwd_device(x, w, b, target, grad_rows, ignore_index, eps, z_loss, softcap, weight_grad, cw,
                                      fp32_grads,
                                      cuda_launcher("linear_cross_entropy_fwd_bwd", launch_cross_entropy_fwd_bwd_cuda));
}
}  // namespace
}  // namespace lt::cross_entropy

TORCH_LIBRARY_IMPL(longtune, CUDA, m) {
  m.impl("linear_cross_entropy_fwd", &lt::cross_entropy::fwd);
  m.impl("linear_cross_entropy_bwd", &lt::cross_entropy::bwd);
  m.impl("linear_cross_entropy_fwd_bwd", &lt::cross_entropy::fwd_bwd);
}
