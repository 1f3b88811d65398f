// Forward attention kernels for head_dim 80 (float16 and bfloat16).
#include "cuda/attention/attn_launch.cuh"

namespace lt::attn {
template const char* launch_attn_fwd_d<80>(const AttnParams&, void*);
}  // namespace lt::attn
