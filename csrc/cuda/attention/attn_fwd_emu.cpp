// Emulator launch file of the forward attention kernel: torch.ops.longtune_emu.sparse_attention_fwd
// on CPU tensors (the same device code as attn_fwd_hd*.cu).
#include <torch/library.h>

#include <string>

#include "cuda/attention/attn_device_op.h"
#include "cuda/attention/attn_kernel.cuh"

namespace lt::attn {
namespace {

void launch_fwd_emu(const AttnFwdParams& s) {
  attn_dispatch(s, [&]<class T, int D>() {
    const AKParams<T> k = make_akparams<T>(s);
    const std::string name = "attn_fwd<D=" + std::to_string(D) + ">";
    using Sh = AttnShape<D>;
    const simt::Dim3 grid{static_cast<uint32_t>((s.nq + Sh::kFwdBQ - 1) / Sh::kFwdBQ),
                          static_cast<uint32_t>(s.hm.heads), static_cast<uint32_t>(s.batch)};
    const simt::Dim3 block{Sh::kFwdThreads, 1, 1};
    try {
      if (s.softcap > 0.f)
        emu::launch(name.c_str(), grid, block, Sh::kFwdSmem, [&k] { attn_fwd_body<T, D, true>(k); });
      else
        emu::launch(name.c_str(), grid, block, Sh::kFwdSmem, [&k] { attn_fwd_body<T, D, false>(k); });
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "longtune_emu: ", e.what());
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& cu_q,
                                       const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                                       double scale, bool causal, int64_t group, c10::string_view mode, int64_t wl,
                                       int64_t wr, int64_t n_global, int64_t q_offset, int64_t kv_offset, double softcap) {
  TORCH_CHECK(q.device().is_cpu(), "longtune_emu: the emulator runs on CPU tensors, got ", q.device());
  return attn_fwd_device(q, k, v, kpm, cu_q, cu_k, max_q, max_k, scale, causal, group, std::string(mode), wl, wr,
                         n_global, q_offset, kv_offset, softcap, launch_fwd_emu);
}

}  // namespace
}  // namespace lt::attn

TORCH_LIBRARY_IMPL(longtune_emu, CPU, m) { m.impl("sparse_attention_fwd", &lt::attn::fwd); }
