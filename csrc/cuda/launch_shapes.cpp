// Launch shape of every product CUDA kernel: the largest block size its launcher uses and its
// dynamic shared memory, taken from the same constants the launchers use (plain C++, built by
// CMakeLists.txt when LONGTUNE_PTXAS_REPORT is on and run after the build). It writes one line per
// kernel, tab-separated:
//   <demangled kernel name pattern (fnmatch, no parameter list)>  <threads>  <dynamic smem bytes | runtime>
// scripts/ptxas_budget.py combines these with ptxas's registers and static shared memory into the
// blocks-per-SM check. A kernel whose dynamic shared memory depends on the call's arguments is
// written as `runtime` (its device op checks the size).
#include <cstdio>
#include <string>

#include "common/hadamard_factors.h"
#include "cuda/attention/attn_head_dims.h"
#include "cuda/attention/attn_params.h"
#include "cuda/cross_entropy/cross_entropy_kernel.cuh"
#include "cuda/hadamard/hadamard_kernel.cuh"
#include "cuda/sparse_delta/sparse_delta_kernel.cuh"

namespace {

void line(FILE* f, const std::string& pattern, int threads, long long smem) {
  if (smem < 0) std::fprintf(f, "%s\t%d\truntime\n", pattern.c_str(), threads);
  else std::fprintf(f, "%s\t%d\t%lld\n", pattern.c_str(), threads, smem);
}

template <int D>
void attention(FILE* f) {
  using S = lt::attn::AttnShape<D>;
  const std::string d = "<*, " + std::to_string(D);
  for (const char* k : {"attn_fwd_kernel", "attn_fwd_kernel_1"})
    line(f, std::string("lt::attn::") + k + d + ", *>", S::kFwdThreads, static_cast<long long>(S::kFwdSmem));
  for (const char* k : {"attn_bwd_kernel", "attn_bwd_kernel_1"})
    line(f, std::string("lt::attn::") + k + d + ", *>", S::kBwdThreads, static_cast<long long>(S::kBwdSmem));
  line(f, "lt::attn::attn_dsum_kernel" + d + ">", lt::attn::kThreads, 0);
  line(f, "lt::attn::attn_dq_convert_kernel" + d + ">", lt::attn::kThreads, 0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUTPUT_FILE\n", argv[0]);
    return 2;
  }
  FILE* f = std::fopen(argv[1], "w");
  if (f == nullptr) {
    std::perror(argv[1]);
    return 1;
  }
#define LT_SHAPE_ATTN(D) attention<D>(f);
  LT_ATTN_HEAD_DIMS(LT_SHAPE_ATTN)
#undef LT_SHAPE_ATTN
  namespace ce = lt::cross_entropy;
  line(f, "lt::cross_entropy::cross_entropy_fwd_kernel<*>", ce::kThreads, static_cast<long long>(ce::kSmemBytes));
  line(f, "lt::cross_entropy::cross_entropy_bwd_kernel<*>", ce::kThreads, static_cast<long long>(ce::kSmemBytes));
  line(f, "lt::cross_entropy::cross_entropy_onepass_fwd_kernel<*>", ce::kThreads,
       static_cast<long long>(ce::kSmemBytes));
  line(f, "lt::cross_entropy::cross_entropy_onepass_bwd_kernel<*>", ce::kThreads,
       static_cast<long long>(ce::kSmemBytes));
  line(f, "lt::cross_entropy::cross_entropy_merge_kernel<*>", ce::kMergeThreads, 0);
  line(f, "lt::cross_entropy::cross_entropy_conv_kernel<*>", ce::kConvThreads, 0);
  // block mode: up to kBlockThreads threads and one fp32 row of n <= kHadamardMaxN in shared memory
  // (warp mode: kWarpModeThreads threads, no shared memory)
  line(f, "lt::hadamard::hadamard_kernel<*>", lt::hadamard::kBlockThreads,
       static_cast<long long>(lt::hadamard::kHadamardMaxN * sizeof(float)));
  // one fp32 row plus two floats per quantization group (the device op checks the total)
  line(f, "lt::quant::quant_kernel<*>", lt::hadamard::kBlockThreads, -1);
  line(f, "lt::sparse_delta::grad_kernel<*>", lt::sparse_delta::kGradThreads, 0);
  line(f, "lt::sparse_delta::adamw_kernel<*>", lt::sparse_delta::kGradThreads, 0);
  return std::fclose(f) == 0 ? 0 : 1;
}
