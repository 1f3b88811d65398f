// Launch parameters of the sparse-delta kernels (plain data; no torch, no CUDA types).
#pragma once
#include <cstdint>

#include "cuda/common/dtype.h"

namespace lt::sparse_delta {

struct GradParams {
  const void* grad_out_t = nullptr;  // [out_features, tokens] grad_out transposed, rows grad_out_t_row_stride apart
  const void* x_t = nullptr;         // [in_features, tokens] x transposed, rows x_t_row_stride apart
  const int64_t* idx = nullptr;      // [K] flat indices r * in_features + c
  float* out = nullptr;              // [K] fp32
  int64_t tokens = 0, out_features = 0, in_features = 0, K = 0;
  int64_t grad_out_t_row_stride = 0, x_t_row_stride = 0;  // elements
  DType dtype = DType::F32;
};

const char* launch_sparse_delta_grad_cuda(const GradParams& p, void* stream);

struct AdamWParams {
  void* values = nullptr;      // [n], dtype
  const void* grad = nullptr;  // [n], dtype
  float* m = nullptr;
  float* v = nullptr;
  int32_t* age = nullptr;
  int64_t n = 0;
  float lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
  DType dtype = DType::F32;
};

const char* launch_sparse_adamw_cuda(const AdamWParams& p, void* stream);

}  // namespace lt::sparse_delta
