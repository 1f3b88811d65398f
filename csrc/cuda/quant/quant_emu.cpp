// Emulator launch file of the rotated-quantization kernels: torch.ops.longtune_emu.* on CPU tensors.
#include <torch/library.h>

#include <string>

#include "cuda/common/emu_glue.h"
#include "cuda/quant/quant_device_op.h"
#include "cuda/quant/quant_kernel.cuh"

namespace lt::quant {
namespace {

// The `launch` callable of the device-op templates, running the kernel on the emulator.
auto emu_launcher(const char* op) {
  return [op](const auto& qp) {  // QuantParams or QuantBwdParams
    const LaunchCfg cfg = quant_launch_config(qp, emu::capped_grid(kMaxGridX));
    quant_dispatch(qp, [&]<class T, int E>() {
      const QKParams<T> k = make_qkparams<T>(qp);
      const std::string name = "quant_kernel<E=" + std::to_string(E) + ", mode=" + std::to_string(int(qp.mode)) + ">";
      emu_launch(op, name.c_str(), cfg, [&k] { quant_body<T, E>(k); });
    });
  };
}

at::Tensor fwd(const at::Tensor& x, int64_t bits, c10::string_view gran, int64_t gs, bool sym, double clip, bool rot,
               int64_t hs, c10::string_view ste) {
  check_emu_input("rotate_fake_quant", x);
  return fake_quant_device(x, bits, std::string(gran), gs, sym, clip, rot, hs, std::string(ste),
                           emu_launcher("rotate_fake_quant"));
}
at::Tensor bwd(const at::Tensor& g, const at::Tensor& x, int64_t bits, c10::string_view gran, int64_t gs, bool sym,
               double clip, bool rot, int64_t hs, c10::string_view ste) {
  check_emu_input("rotate_fake_quant_backward", x);
  return fake_quant_backward_device(g, x, bits, std::string(gran), gs, sym, clip, rot, hs, std::string(ste),
                                    "longtune_emu::hadamard_transform_backward",
                                    emu_launcher("rotate_fake_quant_backward"));
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> codes(const at::Tensor& x, int64_t bits, c10::string_view gran,
                                                     int64_t gs, bool sym, double clip, bool rot, int64_t hs) {
  check_emu_input("rotate_quantize", x);
  return quantize_device(x, bits, std::string(gran), gs, sym, clip, rot, hs, emu_launcher("rotate_quantize"));
}

}  // namespace
}  // namespace lt::quant

TORCH_LIBRARY_IMPL(longtune_emu, CPU, m) {
  m.impl("rotate_fake_quant", &lt::quant::fwd);
  m.impl("rotate_fake_quant_backward", &lt::quant::bwd);
  m.impl("rotate_quantize", &lt::quant::codes);
}
