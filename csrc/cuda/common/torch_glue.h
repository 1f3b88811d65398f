// Torch-side glue shared by the CUDA bindings (*_bindings.cpp) and the emulator bindings
// (*_emu.cpp) of every kernel family: the one at::ScalarType -> DType mapping and the check of a
// launcher's error string.
#pragma once
#include <ATen/ATen.h>

#include "cuda/common/dtype.h"

namespace lt {

// The DType tag of a floating-point tensor the device kernels take (float32, float16, bfloat16);
// the callers' argument checks have already rejected every other dtype.
inline DType to_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: break;
  }
  TORCH_CHECK(false, "longtune: the device kernels take float32, float16 or bfloat16 tensors, got ", st);
}
inline DType to_dtype(const at::Tensor& t) { return to_dtype(t.scalar_type()); }

// Raises "<ns>.<op>: CUDA kernel launch failed: ..." when an nvcc launcher returned an error.
inline void check_cuda_launch(const char* op, const char* err, const char* ns = "longtune") {
  TORCH_CHECK(err == nullptr, ns, ".", op, ": CUDA kernel launch failed: ", err ? err : "");
}

}  // namespace lt
