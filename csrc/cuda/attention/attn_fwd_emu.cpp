// Emulator launch file of the forward attention kernel: torch.ops.longtune_emu.sparse_attention_fwd
// on CPU tensors (the same device code as attn_fwd_hd*.cu).
#include <torch/library.h>

#include <string>

#include "cuda/attention/attn_device_op.h"
#include "cuda/attention/attn_kernel.cuh"
#include "cuda/common/emu_glue.h"

namespace lt::attn {
namespace {

constexpr const char* kFwdOp = "sparse_attention_fwd";

void launch_fwd_emu(const AttnFwdParams& s) {
  attn_dispatch(s, [&]<class T, int D>() {
    const AKParams<T> k = make_akparams<T>(s);
    const std::string name = "attn_fwd<D=" + std::to_string(D) + ">";
    using Sh = AttnShape<D>;
    const simt::Dim3 grid{static_cast<uint32_t>((s.nq + Sh::kFwdBQ - 1) / Sh::kFwdBQ),
                          static_cast<uint32_t>(s.hm.heads), static_cast<uint32_t>(s.batch)};
    const simt::Dim3 block{Sh::kFwdThreads, 1, 1};
    if (s.softcap > 0.f)
      emu_launch(kFwdOp, name.c_str(), grid, block, Sh::kFwdSmem, [&k] { attn_fwd_body<T, D, true>(k); });
    else emu_launch(kFwdOp, name.c_str(), grid, block, Sh::kFwdSmem, [&k] { attn_fwd_body<T, D, false>(k); });
  });
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& cu_q,
                                       const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                                       double scale, at::IntArrayRef mask, double softcap) {
  check_emu_input(kFwdOp, q);
  return attn_fwd_device(q, k, v, kpm, cu_q, cu_k, max_q, max_k, scale, parse_mask("sparse_attention_fwd", mask),
                         softcap, launch_fwd_emu);
}

}  // namespace
}  // namespace lt::attn

TORCH_LIBRARY_IMPL(longtune_emu, CPU, m) { m.impl("sparse_attention_fwd", &lt::attn::fwd); }
