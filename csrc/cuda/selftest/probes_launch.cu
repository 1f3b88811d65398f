// nvcc launchers of the self-test probes (the faulty kernels are emulator-only).
#include "cuda/common/cuda_launch.cuh"
#include "cuda/selftest/probes.cuh"
#include "cuda/selftest/probes_params.h"

namespace lt::selftest {

__global__ void mma_probe_kernel(MmaProbe p) { mma_probe(p); }
__global__ void ldmatrix_probe_kernel(LdmatrixProbe p) { ldmatrix_probe(p); }
__global__ void shfl_probe_kernel(ShflProbe p) { shfl_probe(p); }

const char* probe_cuda(Probe which, const ProbeArgs& a, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  switch (which) {
    case Probe::Mma:
      mma_probe_kernel<<<1, 32, 0, stream>>>(
          MmaProbe{static_cast<const uint32_t*>(a.in), static_cast<float*>(a.out), static_cast<MmaKind>(a.kind)});
      break;
    case Probe::Ldmatrix:
      ldmatrix_probe_kernel<<<1, 32, size_t(a.elems) * 2, stream>>>(
          LdmatrixProbe{static_cast<const uint16_t*>(a.in), static_cast<const int32_t*>(a.arg),
                        static_cast<uint32_t*>(a.out), a.elems, a.nmat, a.trans});
      break;
    case Probe::Shfl:
      shfl_probe_kernel<<<1, 32, 0, stream>>>(
          ShflProbe{static_cast<const int32_t*>(a.in), static_cast<const int32_t*>(a.arg), static_cast<int32_t*>(a.out),
                    static_cast<ShflKind>(a.kind), a.width});
      break;
  }
  return launch_error(cudaGetLastError());
}

}  // namespace lt::selftest
