// Emulator launch file of the sparse-delta kernels: torch.ops.longtune_emu.* on CPU tensors.
#include <torch/library.h>

#include "cuda/common/emu_glue.h"
#include "cuda/sparse_delta/sparse_delta_device_op.h"
#include "cuda/sparse_delta/sparse_delta_kernel.cuh"

namespace lt::sparse_delta {
namespace {
constexpr const char* kGradOp = "sparse_delta_grad";
constexpr const char* kAdamWOp = "sparse_adamw_";

at::Tensor grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& idx, int64_t in_features) {
  check_emu_input(kGradOp, x);
  return sparse_delta_grad_device(g, x, idx, in_features, [](const GradParams& gp) {
    const LaunchCfg cfg = grad_launch_config(gp, emu::capped_grid(kMaxGridX));
    dispatch_dtype(gp.dtype, [&]<class T>() {
      const GradKParams<T> k = make_grad_kparams<T>(gp);
      emu_launch(kGradOp, "sparse_delta_grad_kernel", cfg, [&k] { grad_body<T>(k); });
    });
  });
}
void adamw(const at::Tensor& values, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
           const at::Tensor& age, double lr, double b1, double b2, double eps, double wd) {
  check_emu_input(kAdamWOp, values);
  sparse_adamw_device(values, g, m, v, age, lr, b1, b2, eps, wd, [](const AdamWParams& ap) {
    const LaunchCfg cfg = adamw_launch_config(ap.n, emu::capped_grid(kMaxGridX));
    dispatch_dtype(ap.dtype, [&]<class T>() {
      const AdamWKParams<T> k = make_adamw_kparams<T>(ap);
      emu_launch(kAdamWOp, "sparse_adamw_kernel", cfg, [&k] { adamw_body<T>(k); });
    });
  });
}
}  // namespace
}  // namespace lt::sparse_delta

TORCH_LIBRARY_IMPL(longtune_emu, CPU, m) {
  m.impl("sparse_delta_grad", &lt::sparse_delta::grad);
  m.impl("sparse_adamw_", &lt::sparse_delta::adamw);
}
