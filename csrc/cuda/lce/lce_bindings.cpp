// CUDA registration of the fused linear + cross-entropy ops.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/lce/lce_device_op.h"

namespace lt::lce {
namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& b, const at::Tensor& target,
                                                   int64_t ignore_index, double eps, double z_loss, double softcap,
                                                   const std::optional<at::Tensor>& cw) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lce_fwd_device(x, w, b, target, ignore_index, eps, z_loss, softcap, cw, [](const FwdParams& fp) {
    const char* err = launch_lce_fwd_cuda(fp, at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, "longtune.linear_cross_entropy_fwd: CUDA kernel launch failed: ", err ? err : "");
  });
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& b, const at::Tensor& target,
                                                   const at::Tensor& lse, int64_t ignore_index, double eps,
                                                   double z_loss, double softcap, double filter,
                                                   const std::optional<at::Tensor>& cw) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lce_bwd_device(g, x, w, b, target, lse, ignore_index, eps, z_loss, softcap, filter, cw, [](const BwdParams& bp) {
    const char* err = launch_lce_bwd_cuda(bp, at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, "longtune.linear_cross_entropy_bwd: CUDA kernel launch failed: ", err ? err : "");
  });
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_bwd(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, const at::Tensor& target,
    const at::Tensor& grad_rows, int64_t ignore_index, double eps, double z_loss, double softcap, bool weight_grad,
    const std::optional<at::Tensor>& cw) {
  return lce_fwd_bwd_composed(fwd, bwd, x, w, b, target, grad_rows, ignore_index, eps, z_loss, softcap, weight_grad,
                              cw);
}
}  // namespace
}  // namespace lt::lce

TORCH_LIBRARY_IMPL(longtune, CUDA, m) {
  m.impl("linear_cross_entropy_fwd", &lt::lce::fwd);
  m.impl("linear_cross_entropy_bwd", &lt::lce::bwd);
  m.impl("linear_cross_entropy_fwd_bwd", &lt::lce::fwd_bwd);
}
