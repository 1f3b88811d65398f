// Launch parameters of the sparse-delta kernels (plain data; no torch, no CUDA types).
#pragma once
#include <cstdint>

#include "cuda/hadamard/hadamard_params.h"

namespace lt::sparse_delta {

struct GradParams {
  const void* gt = nullptr;      // [out, T] grad_out transposed, contiguous
  const void* xt = nullptr;      // [in, T] x transposed, contiguous
  const int64_t* idx = nullptr;  // [K] flat indices r * in + c
  float* out = nullptr;          // [K] fp32
  int64_t T = 0, out_features = 0, in_features = 0, K = 0;
  hadamard::DType dtype = hadamard::DType::F32;
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
  hadamard::DType dtype = hadamard::DType::F32;
};

const char* launch_sparse_adamw_cuda(const AdamWParams& p, void* stream);

}  // namespace lt::sparse_delta
