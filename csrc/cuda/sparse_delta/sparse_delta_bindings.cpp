// CUDA registration of the sparse-delta ops.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/sparse_delta/sparse_delta_device_op.h"

namespace lt::sparse_delta {
namespace {
at::Tensor grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& idx, int64_t in_features) {
  const c10::cuda::CUDAGuard guard(x.device());
  return sparse_delta_grad_device(g, x, idx, in_features, [](const GradParams& gp) {
    const char* err = launch_sparse_delta_grad_cuda(gp, at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, "longtune.sparse_delta_grad: CUDA kernel launch failed: ", err ? err : "");
  });
}
void adamw(const at::Tensor& values, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v, const at::Tensor& age,
           double lr, double b1, double b2, double eps, double wd) {
  const c10::cuda::CUDAGuard guard(values.device());
  sparse_adamw_device(values, g, m, v, age, lr, b1, b2, eps, wd, [](const AdamWParams& ap) {
    const char* err = launch_sparse_adamw_cuda(ap, at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, "longtune.sparse_adamw_: CUDA kernel launch failed: ", err ? err : "");
  });
}
}  // namespace
}  // namespace lt::sparse_delta

TORCH_LIBRARY_IMPL(longtune, CUDA, m) {
  m.impl("sparse_delta_grad", &lt::sparse_delta::grad);
  m.impl("sparse_adamw_", &lt::sparse_delta::adamw);
}
