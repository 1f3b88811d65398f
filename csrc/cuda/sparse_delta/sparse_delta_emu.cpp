// Emulator launch file of the sparse-delta kernels: torch.ops.longtune_emu.* on CPU tensors.
#include <torch/library.h>

#include "cuda/sparse_delta/sparse_delta_device_op.h"
#include "cuda/sparse_delta/sparse_delta_kernel.cuh"

namespace lt::sparse_delta {
namespace {
at::Tensor grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& idx, int64_t in_features) {
  TORCH_CHECK(x.device().is_cpu(), "longtune_emu: the emulator runs on CPU tensors, got ", x.device());
  return sparse_delta_grad_device(g, x, idx, in_features, [](const GradParams& gp) {
    const hadamard::LaunchCfg cfg = grad_launch_config(gp, int64_t(1) << 20);
    grad_dispatch(gp, [&]<class T>() {
      const GradKParams<T> k = make_grad_kparams<T>(gp);
      try {
        emu::launch("sparse_delta_grad_kernel", cfg.grid, cfg.block, 0, [&k] { grad_body<T>(k); });
      } catch (const std::exception& e) {
        TORCH_CHECK(false, "longtune_emu: ", e.what());
      }
    });
  });
}
void adamw(const at::Tensor& values, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v, const at::Tensor& age,
           double lr, double b1, double b2, double eps, double wd) {
  TORCH_CHECK(values.device().is_cpu(), "longtune_emu: the emulator runs on CPU tensors, got ", values.device());
  sparse_adamw_device(values, g, m, v, age, lr, b1, b2, eps, wd, [](const AdamWParams& ap) {
    const hadamard::LaunchCfg cfg = adamw_launch_config(ap.n, int64_t(1) << 20);
    dtype_dispatch(ap.dtype, [&]<class T>() {
      const AdamWKParams<T> k = make_adamw_kparams<T>(ap);
      try {
        emu::launch("sparse_adamw_kernel", cfg.grid, cfg.block, 0, [&k] { adamw_body<T>(k); });
      } catch (const std::exception& e) {
        TORCH_CHECK(false, "longtune_emu: ", e.what());
      }
    });
  });
}
}  // namespace
}  // namespace lt::sparse_delta

TORCH_LIBRARY_IMPL(longtune_emu, CPU, m) {
  m.impl("sparse_delta_grad", &lt::sparse_delta::grad);
  m.impl("sparse_adamw_", &lt::sparse_delta::adamw);
}
