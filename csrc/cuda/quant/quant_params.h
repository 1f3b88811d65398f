// Launch parameters of the rotated-quantization kernels (plain data; no torch, no CUDA types).
#pragma once
#include <cstdint>

#include "common/quant.h"
#include "cuda/common/dtype.h"

namespace lt::quant {

enum class KMode : int32_t { Fake = 0, Mask = 1, Codes = 2 };

// Forward kernels: rotate_fake_quant (mode Fake) and rotate_quantize (mode Codes).
struct QuantParams {
  const void* x = nullptr;   // [rows, n], row stride x_row_stride, unit inner stride
  void* y = nullptr;         // Fake / Mask: [rows, n] contiguous, x's dtype
  void* codes = nullptr;     // Codes: [rows, n] int8 (symmetric) / uint8
  float* scales = nullptr;   // Codes: [rows, groups]
  float* zeros = nullptr;
  const uint32_t* hbits = nullptr;  // sign table of the rotation's factor (m > 1), as in HadamardParams
  int64_t rows = 0, n = 0, x_row_stride = 0;
  int64_t x_span = 0, hbits_span = 0;
  int64_t h = 1, group = 1, ngroups = 1;  // rotation block, quantization group
  int32_t m = 1, log2p = 0, hwords = 0;
  bool rotate = false;
  float rscale = 1.f;
  QuantCfg cfg;
  KMode mode = KMode::Fake;
  DType dtype = DType::F32;
  int32_t chunk = 8;  // elements per thread chunk (power of two dividing n, and 2^log2p when rotating)
  bool vec_ok = true;
};

// Backward kernel: rotate_fake_quant_backward (mode Mask), the STE mask of the incoming gradient,
// decided on the forward's rotated values of x.
struct QuantBwdParams : QuantParams {
  const void* grad = nullptr;  // [rows, n], row stride grad_row_stride, unit inner stride, x's dtype
  int64_t grad_row_stride = 0, grad_span = 0;
};

// nvcc-compiled launchers (quant_launch.cu); return a CUDA error string or nullptr.
const char* launch_quant_cuda(const QuantParams& p, void* stream);
const char* launch_quant_bwd_cuda(const QuantBwdParams& p, void* stream);

}  // namespace lt::quant
