// Backward attention kernels (Dsum, main, dq conversion) for head_dim 128 (float16 and bfloat16).
#include "cuda/attention/attn_launch.cuh"

namespace lt::attn {
template const char* launch_attn_bwd_d<128>(const AttnParams&, void*);
}  // namespace lt::attn
