// Forward attention kernels for head_dim 96 (float16 and bfloat16).
#include "cuda/attention/attn_launch.cuh"

namespace lt::attn {
template const char* launch_attn_fwd_d<96>(const AttnParams&, void*);
}  // namespace lt::attn
