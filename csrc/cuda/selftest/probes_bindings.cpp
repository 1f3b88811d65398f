// CUDA registration of the self-test probes: runs them on the real GPU so gpu-check can compare
// the hardware's fragments with the emulator's.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/common/cuda_glue.h"
#include "cuda/selftest/probes_host.h"

namespace lt::selftest {
namespace {
auto cuda_runner(const at::Tensor& t) {
  return [dev = t.device()](Probe which, const ProbeArgs& a) {
    const c10::cuda::CUDAGuard guard(dev);
    check_cuda_launch("probe", probe_cuda(which, a, current_cuda_stream()), "longtune_test");
  };
}
at::Tensor mma(const at::Tensor& in, int64_t kind) { return mma_probe_op(in, kind, cuda_runner(in)); }
at::Tensor ldm(const at::Tensor& tile, const at::Tensor& rows, int64_t nmat, bool trans) {
  return ldmatrix_probe_op(tile, rows, nmat, trans, cuda_runner(tile));
}
at::Tensor shfl(const at::Tensor& v, const at::Tensor& arg, int64_t kind, int64_t width) {
  return shfl_probe_op(v, arg, kind, width, cuda_runner(v));
}
}  // namespace
}  // namespace lt::selftest

TORCH_LIBRARY_IMPL(longtune_test, CUDA, m) {
  m.impl("mma_probe", &lt::selftest::mma);
  m.impl("ldmatrix_probe", &lt::selftest::ldm);
  m.impl("shfl_probe", &lt::selftest::shfl);
}
