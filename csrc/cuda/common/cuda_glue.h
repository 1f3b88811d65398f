// Torch-side glue of the CUDA bindings (*_bindings.cpp, compiled only in CUDA builds): runs an
// nvcc launcher on the current stream and checks its error string.
#pragma once
#include <ATen/cuda/CUDAContext.h>

#include "cuda/common/torch_glue.h"

namespace lt {

inline void* current_cuda_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// The `launch` callable the device-op templates take, for a launcher `const char* (const P&, void*)`.
template <class P>
auto cuda_launcher(const char* op, const char* (*launcher)(const P&, void*)) {
  return [op, launcher](const P& p) { check_cuda_launch(op, launcher(p, current_cuda_stream())); };
}

}  // namespace lt
