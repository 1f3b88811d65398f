// Emulator launch file of the fused linear + cross-entropy kernels: torch.ops.longtune_emu.* on
// CPU tensors (the same device code as lce_launch.cu).
#include <torch/library.h>

#include <type_traits>

#include "cuda/lce/lce_device_op.h"
#include "cuda/lce/lce_kernel.cuh"

namespace lt::lce {
namespace {
template <class Body>
void run(const char* name, const Grid& g, size_t smem, const Body& body) {
  try {
    emu::launch(name, g.grid, g.block, smem, body);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "longtune_emu: ", e.what());
  }
}

template <class T>
void convert(const float* in, void* out, int64_t n, const char* name) {
  if (n <= 0) return;
  const ConvK<T> k = make_conv<T>(in, out, n, name);
  run("lce_conv_kernel", conv_config(n), 0, [&k] { conv_body<T>(k); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& b, const at::Tensor& target,
                                                   int64_t ignore_index, double eps, double z_loss, double softcap,
                                                   const std::optional<at::Tensor>& cw) {
  TORCH_CHECK(x.device().is_cpu(), "longtune_emu: the emulator runs on CPU tensors, got ", x.device());
  return lce_fwd_device(x, w, b, target, ignore_index, eps, z_loss, softcap, cw, [](const FwdParams& fp) {
    dtype_dispatch(fp.dtype, [&]<class T>() {
      const FwdK<T> k = make_fwd<T>(fp);
      run("lce_fwd_kernel", fwd_config(fp), kSmemBytes, [&k] { fwd_body<T>(k); });
      run("lce_merge_kernel", merge_config(fp.T), 0, [&k] { merge_body<T>(k); });
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& b, const at::Tensor& target,
                                                   const at::Tensor& lse, int64_t ignore_index, double eps,
                                                   double z_loss, double softcap, double filter,
                                                   const std::optional<at::Tensor>& cw) {
  TORCH_CHECK(x.device().is_cpu(), "longtune_emu: the emulator runs on CPU tensors, got ", x.device());
  return lce_bwd_device(g, x, w, b, target, lse, ignore_index, eps, z_loss, softcap, filter, cw, [](const BwdParams& bp) {
    dtype_dispatch(bp.dtype, [&]<class T>() {
      const BwdK<T> k = make_bwd<T>(bp);
      run("lce_bwd_kernel", bwd_config(bp), kSmemBytes, [&k] { bwd_body<T>(k); });
      if constexpr (!std::is_same_v<T, float>) {
        convert<T>(bp.dx32, bp.dx, bp.T * bp.d, "dx");
        convert<T>(bp.dw32, bp.dw, bp.V * bp.d, "dweight");
        if (bp.db32 != nullptr) convert<T>(bp.db32, bp.db, bp.V, "dbias");
      }
    });
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

TORCH_LIBRARY_IMPL(longtune_emu, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &lt::lce::fwd);
  m.impl("linear_cross_entropy_bwd", &lt::lce::bwd);
  m.impl("linear_cross_entropy_fwd_bwd", &lt::lce::fwd_bwd);
}
