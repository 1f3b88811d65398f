// Emulator launch file of the rotated-quantization kernels: torch.ops.longtune_emu.* on CPU tensors.
#include <torch/library.h>

#include <string>

#include "cuda/quant/quant_device_op.h"
#include "cuda/quant/quant_kernel.cuh"

namespace lt::quant {
namespace {

void launch_emu(const QuantParams& qp) {
  const hadamard::LaunchCfg cfg = quant_launch_config(qp, int64_t(1) << 20);
  quant_dispatch(qp, [&]<class T, int E>() {
    const QKParams<T> k = make_qkparams<T>(qp);
    const std::string name = "quant_kernel<E=" + std::to_string(E) + ", mode=" + std::to_string(int(qp.mode)) + ">";
    try {
      emu::launch(name.c_str(), cfg.grid, cfg.block, cfg.smem, [&k] { quant_body<T, E>(k); });
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "longtune_emu: ", e.what());
    }
  });
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "longtune_emu: the emulator runs on CPU tensors, got ", x.device());
}

at::Tensor fwd(const at::Tensor& x, int64_t bits, c10::string_view gran, int64_t gs, bool sym, double clip,
               bool rot, int64_t hs, c10::string_view ste) {
  check_cpu(x);
  return fake_quant_device(x, bits, std::string(gran), gs, sym, clip, rot, hs, std::string(ste), launch_emu);
}
at::Tensor bwd(const at::Tensor& g, const at::Tensor& x, int64_t bits, c10::string_view gran, int64_t gs, bool sym,
               double clip, bool rot, int64_t hs, c10::string_view ste) {
  check_cpu(x);
  return fake_quant_backward_device(g, x, bits, std::string(gran), gs, sym, clip, rot, hs, std::string(ste),
                                    "longtune_emu::hadamard_transform_backward", launch_emu);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> codes(const at::Tensor& x, int64_t bits, c10::string_view gran,
                                                     int64_t gs, bool sym, double clip, bool rot, int64_t hs) {
  check_cpu(x);
  return quantize_device(x, bits, std::string(gran), gs, sym, clip, rot, hs, launch_emu);
}

}  // namespace
}  // namespace lt::quant

TORCH_LIBRARY_IMPL(longtune_emu, CPU, m) {
  m.impl("rotate_fake_quant", &lt::quant::fwd);
  m.impl("rotate_fake_quant_backward", &lt::quant::bwd);
  m.impl("rotate_quantize", &lt::quant::codes);
}
