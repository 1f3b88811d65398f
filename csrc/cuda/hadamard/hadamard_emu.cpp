// Emulator launch file: the same device headers as hadamard_launch.cu, compiled by the host
// compiler and run on the CPU emulator. Registered as torch.ops.longtune_emu.hadamard_transform*
// on CPU tensors so the tests can check the CUDA kernel's device code without a GPU.
#include <torch/library.h>

#include <string>

#include "cuda/common/emu_glue.h"
#include "cuda/hadamard/hadamard_device_op.h"
#include "cuda/hadamard/hadamard_kernel.cuh"

namespace lt::hadamard {
namespace {

void launch_emu(const char* op, const HadamardParams& hp) {
  const LaunchCfg cfg = launch_config(hp, emu::capped_grid(kMaxGridX));
  dispatch(hp, [&]<class T, int E>() {
    const KParams<T> k = make_kparams<T>(hp);
    const std::string name = std::string("hadamard_kernel<") + dtype_name(hp.dtype) + ", E=" + std::to_string(E) +
                             (k.block_mode ? ", block mode>" : ", warp mode>");
    emu_launch(op, name.c_str(), cfg, [&k] { hadamard_body<T, E>(k); });
  });
}

at::Tensor run_emu(const char* op, const at::Tensor& x, double scale, bool transpose) {
  check_emu_input(op, x);
  return run_device_op(op, x, scale, transpose, [&](const HadamardParams& hp) { launch_emu(op, hp); });
}

at::Tensor fwd(const at::Tensor& x, double scale) { return run_emu("hadamard_transform", x, scale, false); }
at::Tensor bwd(const at::Tensor& g, double scale) { return run_emu("hadamard_transform_backward", g, scale, true); }

}  // namespace
}  // namespace lt::hadamard

TORCH_LIBRARY_IMPL(longtune_emu, CPU, m) {
  m.impl("hadamard_transform", &lt::hadamard::fwd);
  m.impl("hadamard_transform_backward", &lt::hadamard::bwd);
}
