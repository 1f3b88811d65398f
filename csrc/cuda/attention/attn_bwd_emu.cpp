// Emulator launch file of the backward attention kernels: torch.ops.longtune_emu.sparse_attention_bwd
// on CPU tensors (the same device code as attn_bwd_hd*.cu: Dsum, main kernel, dq conversion).
#include <torch/library.h>

#include <string>

#include "cuda/attention/attn_device_op.h"
#include "cuda/attention/attn_kernel.cuh"
#include "cuda/common/emu_glue.h"

namespace lt::attn {
namespace {

constexpr const char* kBwdOp = "sparse_attention_bwd";

simt::Dim3 flat(int64_t n) { return simt::Dim3{static_cast<uint32_t>((n + kThreads - 1) / kThreads), 1, 1}; }

void launch_bwd_emu(const AttnBwdParams& s) {
  attn_dispatch(s, [&]<class T, int D>() {
    const AKParams<T> k = make_akparams<T>(s);
    const std::string sfx = "<D=" + std::to_string(D) + ">";
    const simt::Dim3 block{kThreads, 1, 1};
    using Sh = AttnShape<D>;
    const simt::Dim3 grid{static_cast<uint32_t>((s.nk + Sh::kBwdBK - 1) / Sh::kBwdBK), static_cast<uint32_t>(s.hm.hkv),
                          static_cast<uint32_t>(s.batch)};
    const simt::Dim3 bwd_block{Sh::kBwdThreads, 1, 1};
    emu_launch(kBwdOp, ("attn_dsum" + sfx).c_str(), flat(s.total_q * s.hm.heads), block, 0,
               [&k] { attn_dsum_body<T, D>(k); });
    if (s.softcap > 0.f)
      emu_launch(kBwdOp, ("attn_bwd" + sfx).c_str(), grid, bwd_block, Sh::kBwdSmem,
                 [&k] { attn_bwd_body<T, D, true>(k); });
    else
      emu_launch(kBwdOp, ("attn_bwd" + sfx).c_str(), grid, bwd_block, Sh::kBwdSmem,
                 [&k] { attn_bwd_body<T, D, false>(k); });
    emu_launch(kBwdOp, ("attn_dq_convert" + sfx).c_str(), flat(s.total_q * s.hm.hq * D / 8), block, 0,
               [&k] { attn_dq_convert_body<T, D>(k); });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                   const std::optional<at::Tensor>& kpm,
                                                   const std::optional<at::Tensor>& cu_q,
                                                   const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                                                   double scale, at::IntArrayRef mask, double softcap) {
  check_emu_input(kBwdOp, q);
  return attn_bwd_device(grad_out, q, k, v, out, lse, kpm, cu_q, cu_k, max_q, max_k, scale,
                         parse_mask("sparse_attention_bwd", mask), softcap, launch_bwd_emu);
}

}  // namespace
}  // namespace lt::attn

TORCH_LIBRARY_IMPL(longtune_emu, CPU, m) { m.impl("sparse_attention_bwd", &lt::attn::bwd); }
