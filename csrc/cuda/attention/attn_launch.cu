// Head-dim dispatch of the attention launchers (the kernels are instantiated in attn_*_hd*.cu).
#include "cuda/attention/attn_launch.cuh"

namespace lt::attn {

const char* launch_attn_fwd_cuda(const AttnParams& s, void* stream) {
  switch (s.d) {
    case 64: return launch_attn_fwd_d<64>(s, stream);
    case 80: return launch_attn_fwd_d<80>(s, stream);
    case 96: return launch_attn_fwd_d<96>(s, stream);
    case 128: return launch_attn_fwd_d<128>(s, stream);
    default: return "unsupported head_dim (expected 64, 80, 96 or 128)";
  }
}

const char* launch_attn_bwd_cuda(const AttnParams& s, void* stream) {
  switch (s.d) {
    case 64: return launch_attn_bwd_d<64>(s, stream);
    case 80: return launch_attn_bwd_d<80>(s, stream);
    case 96: return launch_attn_bwd_d<96>(s, stream);
    case 128: return launch_attn_bwd_d<128>(s, stream);
    default: return "unsupported head_dim (expected 64, 80, 96 or 128)";
  }
}

}  // namespace lt::attn
