// nvcc-only launch helpers shared by every *_launch.cu: the <<<...>>> launch with its dynamic
// shared-memory opt-in and the launch-error check. No torch headers (build time).
#pragma once
#include <cuda_runtime.h>

#include "cuda/common/launch.h"

namespace lt {

inline dim3 to_dim3(const simt::Dim3& d) { return dim3(d.x, d.y, d.z); }

// The launchers' error convention: nullptr on success, else the CUDA error string.
inline const char* launch_error(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

// Kernels asking for more than 48 KiB of dynamic shared memory must opt in first.
template <class Kernel>
cudaError_t allow_dynamic_smem(Kernel* kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

// Launches `kernel` with `cfg` on `stream`; returns the first error (opt-in or launch), or cudaSuccess.
template <class Kernel, class... Args>
cudaError_t launch_kernel(Kernel* kernel, const LaunchCfg& cfg, void* stream, const Args&... args) {
  const cudaError_t err = allow_dynamic_smem(kernel, cfg.smem);
  if (err != cudaSuccess) return err;
  kernel<<<to_dim3(cfg.grid), to_dim3(cfg.block), cfg.smem, static_cast<cudaStream_t>(stream)>>>(args...);
  return cudaGetLastError();
}

}  // namespace lt
