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
constexpr const char* kFwdBwdOp = "linear_cross_entropy_fwd_bwd";

template <class T>
void convert(const float* in, void* out, int64_t n, const char* name, const char* op = kBwdOp) {
  if (n <= 0 || out == nullptr) return;
  const ConvK<T> k = make_conv<T>(in, out, n, name);
  emu_launch(op, "cross_entropy_conv_kernel", conv_config(n, emu::capped_grid(kNoGridCap)), [&k] { conv_body<T>(k); });
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_bwd(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, const at::Tensor& target,
    const at::Tensor& grad_rows, int64_t ignore_index, double eps, double z_loss, double softcap, bool weight_grad,
    const std::optional<at::Tensor>& cw, bool fp32_grads) {
  check_emu_input(kFwdBwdOp, x);
  return cross_entropy_fwd_bwd_device(
      x, w, b, target, grad_rows, ignore_index, eps, z_loss, softcap, weight_grad, cw, fp32_grads,
      [](const OnePassParams& p) {
        dispatch_dtype(p.fwd.dtype, [&]<class T>() {
          for (int64_t r0 = 0; r0 < p.fwd.T; r0 += p.rows) {
            const auto [fp, bp] = onepass_chunk(p, r0, std::min(p.rows, p.fwd.T - r0));
            const FwdK<T> fk = make_fwd<T>(fp);
            emu_launch(kFwdBwdOp, "cross_entropy_onepass_fwd_kernel", fwd_config(fp, emu::capped_grid(kNoGridCap)),
                       [&fk] { fwd_body<T, true>(fk); });
            emu_launch(kFwdBwdOp, "cross_entropy_merge_kernel", merge_config(fp.T, emu::capped_grid(kNoGridCap)),
                       [&fk] { merge_body<T>(fk); });
            const BwdK<T> bk = make_bwd<T>(bp);
            emu_launch(kFwdBwdOp, "cross_entropy_onepass_bwd_kernel", bwd_config(bp, emu::capped_grid(kNoGridCap)),
                       [&bk] { bwd_body<T, true>(bk); });
          }
          if constexpr (!std::is_same_v<T, float>) {
            const BwdParams& bp = p.bwd;
            convert<T>(bp.dx32, bp.dx, bp.T * bp.d, "dx", kFwdBwdOp);
            convert<T>(bp.dw32, bp.dw, bp.V * bp.d, "dweight", kFwdBwdOp);
            convert<T>(bp.db32, bp.db, bp.V, "dbias", kFwdBwdOp);
          }
        });
      });
}
}  // namespace
}  // namespace lt::cross_entropy

TORCH_LIBRARY_IMPL(longtune_emu, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &lt::cross_entropy::fwd);
  m.impl("linear_cross_entropy_bwd", &lt::cross_entropy::bwd);
  m.impl("linear_cross_entropy_fwd_bwd", &lt::cross_entropy::fwd_bwd);
}
