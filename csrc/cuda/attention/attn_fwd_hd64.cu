// Forward attention kernels for head_dim 64 (float16 and bfloat16).
#include "cuda/attention/attn_launch.cuh"

namespace lt::attn {
template const char* launch_attn_fwd_d<64>(const AttnParams&, void*);
}  // namespace lt::attn
