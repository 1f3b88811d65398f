// Head-dim dispatch of the attention launchers (the kernels are instantiated in attn_*_hd*.cu, one
// pair per head dim of LT_ATTN_HEAD_DIMS).
#include <string>

#include "cuda/attention/attn_launch.cuh"

namespace lt::attn {
namespace {
const char* unsupported_head_dim() {
  static const std::string msg = "unsupported head_dim (supported: " + attn_head_dims_str() + ")";
  return msg.c_str();
}
}  // namespace

const char* launch_attn_fwd_cuda(const AttnFwdParams& s, void* stream) {
  const char* err = unsupported_head_dim();
  attn_head_dim_switch(s.d, [&]<int D>() { err = launch_attn_fwd_d<D>(s, stream); });
  return err;
}

const char* launch_attn_bwd_cuda(const AttnBwdParams& s, void* stream) {
  const char* err = unsupported_head_dim();
  attn_head_dim_switch(s.d, [&]<int D>() { err = launch_attn_bwd_d<D>(s, stream); });
  return err;
}

}  // namespace lt::attn
