// CUDA registration of the sparse-attention ops.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/attention/attn_device_op.h"

namespace lt::attn {
namespace {

template <class L>
auto cuda_launch(const at::Tensor& q, const char* op, L launcher) {
  return [dev = q.device(), op, launcher](const auto& p) {
    const c10::cuda::CUDAGuard guard(dev);
    const char* err = launcher(p, at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, "longtune.", op, ": CUDA kernel launch failed: ", err ? err : "");
  };
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& cu_q,
                                       const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                                       double scale, at::IntArrayRef mask, double softcap) {
  const c10::cuda::CUDAGuard guard(q.device());
  return attn_fwd_device(q, k, v, kpm, cu_q, cu_k, max_q, max_k, scale, parse_mask("sparse_attention_fwd", mask),
                         softcap, cuda_launch(q, "sparse_attention_fwd", &launch_attn_fwd_cuda));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                   const std::optional<at::Tensor>& kpm,
                                                   const std::optional<at::Tensor>& cu_q,
                                                   const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                                                   double scale, at::IntArrayRef mask, double softcap) {
  const c10::cuda::CUDAGuard guard(q.device());
  return attn_bwd_device(grad_out, q, k, v, out, lse, kpm, cu_q, cu_k, max_q, max_k, scale,
                         parse_mask("sparse_attention_bwd", mask), softcap,
                         cuda_launch(q, "sparse_attention_bwd", &launch_attn_bwd_cuda));
}

}  // namespace
}  // namespace lt::attn

TORCH_LIBRARY_IMPL(longtune, CUDA, m) {
  m.impl("sparse_attention_fwd", &lt::attn::fwd);
  m.impl("sparse_attention_bwd", &lt::attn::bwd);
}
