// CUDA registration of the sparse-delta ops.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/common/cuda_glue.h"
#include "cuda/sparse_delta/sparse_delta_device_op.h"

namespace lt::sparse_delta {
namespace {
at::Tensor grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& idx, int64_t in_features) {
  const c10::cuda::CUDAGuard guard(x.device());
  return sparse_delta_grad_device(g, x, idx, in_features,
                                  cuda_launcher("sparse_delta_grad", launch_sparse_delta_grad_cuda));
}
void adamw(const at::Tensor& values, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
           const at::Tensor& age, double lr, double b1, double b2, double eps, double wd) {
  const c10::cuda::CUDAGuard guard(values.device());
  sparse_adamw_device(values, g, m, v, age, lr, b1, b2, eps, wd,
                      cuda_launcher("sparse_adamw_", launch_sparse_adamw_cuda));
}
}  // namespace
}  // namespace lt::sparse_delta

TORCH_LIBRARY_IMPL(longtune, CUDA, m) {
  m.impl("sparse_delta_grad", &lt::sparse_delta::grad);
  m.impl("sparse_adamw_", &lt::sparse_delta::adamw);
}
