// Launch parameters of the Hadamard kernels: plain data, no torch and no CUDA types, shared by
// the nvcc launcher (hadamard_launch.cu), the emulator launcher (hadamard_emu.cpp) and the host
// bindings.
#pragma once
#include <cstdint>

#include "cuda/common/dtype.h"

namespace lt::hadamard {

// One struct for both directions: the backward is the same kernel with the transposed sign table.
struct HadamardParams {
  const void* x = nullptr;      // [rows, n] rows of `x_row_stride` elements, unit stride within a row
  void* y = nullptr;            // [rows, n] contiguous
  const uint32_t* hbits = nullptr;  // sign bits of the m x m factor: word c*hwords + a/32, bit a%32 set
                                    // when the coefficient of input block a in output block c is -1
  int64_t rows = 0, n = 0, x_row_stride = 0;
  int64_t x_span = 0, y_span = 0, hbits_span = 0;  // elements addressable from each base (bounds)
  int32_t m = 1, log2p = 0, hwords = 0;
  float scale = 1.f;
  DType dtype = DType::F32;
  bool vec_ok = true;  // bases and row strides aligned for vector loads / stores
};

// nvcc-compiled launcher (hadamard_launch.cu); returns a CUDA error string or nullptr.
const char* launch_hadamard_cuda(const HadamardParams& p, void* stream);

}  // namespace lt::hadamard
