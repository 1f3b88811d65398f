// CUDA registration of the rotated-quantization ops.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/common/cuda_glue.h"
#include "cuda/quant/quant_device_op.h"

namespace lt::quant {
namespace {

at::Tensor fwd(const at::Tensor& x, int64_t bits, c10::string_view gran, int64_t gs, bool sym, double clip, bool rot,
               int64_t hs, c10::string_view ste) {
  const c10::cuda::CUDAGuard guard(x.device());
  return fake_quant_device(x, bits, std::string(gran), gs, sym, clip, rot, hs, std::string(ste),
                           cuda_launcher("rotate_fake_quant", launch_quant_cuda));
}
at::Tensor bwd(const at::Tensor& g, const at::Tensor& x, int64_t bits, c10::string_view gran, int64_t gs, bool sym,
               double clip, bool rot, int64_t hs, c10::string_view ste) {
  const c10::cuda::CUDAGuard guard(x.device());
  return fake_quant_backward_device(g, x, bits, std::string(gran), gs, sym, clip, rot, hs, std::string(ste),
                                    "longtune::hadamard_transform_backward",
                                    cuda_launcher("rotate_fake_quant_backward", launch_quant_bwd_cuda));
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> codes(const at::Tensor& x, int64_t bits, c10::string_view gran,
                                                     int64_t gs, bool sym, double clip, bool rot, int64_t hs) {
  const c10::cuda::CUDAGuard guard(x.device());
  return quantize_device(x, bits, std::string(gran), gs, sym, clip, rot, hs,
                         cuda_launcher("rotate_quantize", launch_quant_cuda));
}

}  // namespace
}  // namespace lt::quant

TORCH_LIBRARY_IMPL(longtune, CUDA, m) {
  m.impl("rotate_fake_quant", &lt::quant::fwd);
  m.impl("rotate_fake_quant_backward", &lt::quant::bwd);
  m.impl("rotate_quantize", &lt::quant::codes);
}
