// CUDA registration of the rotated-quantization ops.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/quant/quant_device_op.h"

namespace lt::quant {
namespace {

auto cuda_launch(const at::Tensor& x, const char* op) {
  return [dev = x.device(), op](const QuantParams& qp) {
    const c10::cuda::CUDAGuard guard(dev);
    const char* err = launch_quant_cuda(qp, at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, "longtune.", op, ": CUDA kernel launch failed: ", err ? err : "");
  };
}

at::Tensor fwd(const at::Tensor& x, int64_t bits, c10::string_view gran, int64_t gs, bool sym, double clip,
               bool rot, int64_t hs, c10::string_view ste) {
  return fake_quant_device(x, bits, std::string(gran), gs, sym, clip, rot, hs, std::string(ste),
                           cuda_launch(x, "rotate_fake_quant"));
}
at::Tensor bwd(const at::Tensor& g, const at::Tensor& x, int64_t bits, c10::string_view gran, int64_t gs, bool sym,
               double clip, bool rot, int64_t hs, c10::string_view ste) {
  return fake_quant_backward_device(g, x, bits, std::string(gran), gs, sym, clip, rot, hs, std::string(ste),
                                    "longtune::hadamard_transform_backward", cuda_launch(x, "rotate_fake_quant_backward"));
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> codes(const at::Tensor& x, int64_t bits, c10::string_view gran,
                                                     int64_t gs, bool sym, double clip, bool rot, int64_t hs) {
  return quantize_device(x, bits, std::string(gran), gs, sym, clip, rot, hs, cuda_launch(x, "rotate_quantize"));
}

}  // namespace
}  // namespace lt::quant

TORCH_LIBRARY_IMPL(longtune, CUDA, m) {
  m.impl("rotate_fake_quant", &lt::quant::fwd);
  m.impl("rotate_fake_quant_backward", &lt::quant::bwd);
  m.impl("rotate_quantize", &lt::quant::codes);
}
