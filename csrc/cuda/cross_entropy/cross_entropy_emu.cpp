// Emulator launch file of the fused linear + cross-entropy kernels: torch.ops.longtune_emu.* on
// CPU tensors (the same device code as cross_entropy_launch.cu).
#include <torch/library.h>

#include <type_traits>

#include "cuda/common/emu_glue.h"
#include "cuda/cross_entropy/cross_entropy_device_op.h"
#include "cuda/cross_entropy/cross_entropy_kernel.cuh"

namespace lt::cross_entropy {
namespace {
constexpr const char* kFwdOp = "linear_cross_entropy_fwd";
constexpr const char* kBwdOp = "linear_cross_entropy_bwd";

template <class T>
void convert(const float* in, void* out, int64_t n, const char* name) {
  if (n <= 0) return;
  const ConvK<T> k = make_conv<T>(in, out, n, name);
  emu_launch(kBwdOp, "cross_entropy_conv_kernel", conv_config(n, emu::capped_grid(kNoGridCap)),
             [&k] { conv_body<T>(k); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& b, const at::Tensor& target,
                                                   int64_t ignore_index, double eps, double z_loss, double softcap,
                                                   const std::optional<at::Tensor>& cw) {
  check_emu_input(kFwdOp, x);
  return cross_entropy_fwd_device(x, w, b, target, ignore_index, eps, z_loss, softcap, cw, [](const FwdParams& fp) {
    dispatch_dtype(fp.dtype, [&]<class T>() {
      const FwdK<T> k = make_fwd<T>(fp);
      emu_launch(kFwdOp, "cross_entropy_fwd_kernel", fwd_config(fp, emu::capped_grid(kNoGridCap)),
                 [&k] { fwd_body<T>(k); });
      emu_launch(kFwdOp, "cross_entropy_merge_kernel", merge_config(fp.T, emu::capped_grid(kNoGridCap)),
                 [&k] { merge_body<T>(k); });
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& b, const at::Tensor& target,
                                                   const at::Tensor& lse, int64_t ignore_index, double eps,
                                                   double z_loss, double softcap, double filter,
                                                   const std::optional<at::Tensor>& cw) {
  check_emu_input(kBwdOp, x);
  return cross_entropy_bwd_device(
      g, x, w, b, target, lse, ignore_index, eps, z_loss, softcap, filter, cw, [](const BwdParams& bp) {
        dispatch_dtype(bp.dtype, [&]<class T>() {
          const BwdK<T> k = make_bwd<T>(bp);
          emu_launch(kBwdOp, "cross_entropy_bwd_kernel", bwd_config(bp, emu::capped_grid(kNoGridCap)),
                     [&k] { bwd_body<T>(k); });
          if constexpr (!std::is_same_v<T, float>) {
            convert<T>(bp.dx32, bp.dx, bp.T * bp.d, "dx");
            convert<T>(bp.dw32, bp.dw, bp.V * bp.d, "dweight");
            if (bp.db32 != nullptr) convert<T>(bp.db32, bp.db, bp.V, "dbias");
          }
        });
      });
}
}  // namespace
}  // namespace lt::cross_entropy

TORCH_LIBRARY_IMPL(longtune_emu, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &lt::cross_entropy::fwd);
  m.impl("linear_cross_entropy_bwd", &lt::cross_entropy::bwd);
  m.impl("linear_cross_entropy_fwd_bwd",
         (&lt::cross_entropy::cross_entropy_fwd_bwd_composed<&lt::cross_entropy::fwd, &lt::cross_entropy::bwd>));
}
