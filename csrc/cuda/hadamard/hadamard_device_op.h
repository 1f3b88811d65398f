// Host glue shared by the CUDA binding and the emulator binding of the Hadamard kernels: both
// validate the same way (common/hadamard_host.h), build the same sign table and fill the same
// params struct; only the launcher differs.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "common/hadamard_host.h"
#include "cuda/common/torch_glue.h"
#include "cuda/hadamard/hadamard_params.h"

namespace lt::hadamard {

// Sign bits of H_m (or H_m^T) in the layout HadamardParams::hbits documents, on `device`, cached.
inline at::Tensor sign_table(int64_t m, bool transpose, const at::Device& device) {
  static std::mutex mu;
  static std::map<std::tuple<std::string, int64_t, bool>, at::Tensor> cache;
  std::lock_guard<std::mutex> g(mu);
  const auto key = std::make_tuple(device.str(), m, transpose);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const int64_t words = (m + 31) / 32;
  at::Tensor t = at::zeros({m * words}, at::dtype(at::kInt));
  auto* w = reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>());
  const auto& H = factor(m);
  for (int64_t c = 0; c < m; ++c)
    for (int64_t a = 0; a < m; ++a)
      if ((transpose ? H[c * m + a] : H[a * m + c]) < 0) w[c * words + a / 32] |= 1u << (a % 32);
  t = t.to(device);
  cache.emplace(key, t);
  return t;
}

template <class Launch>
at::Tensor run_device_op(const char* op, const at::Tensor& x, double scale, bool transpose, Launch&& launch) {
  Call c = prepare(op, x, scale, /*allow_f64=*/false);
  if (c.empty) return c.out;
  const at::Tensor hb = sign_table(c.plan.m, transpose, x.device());
  HadamardParams hp;
  hp.x = c.rows.data_ptr();
  hp.y = c.out.data_ptr();
  hp.hbits = reinterpret_cast<const uint32_t*>(hb.data_ptr<int32_t>());
  hp.rows = c.rows.size(0);
  hp.n = c.plan.n;
  hp.x_row_stride = c.rows.stride(0);
  hp.x_span = (hp.rows - 1) * hp.x_row_stride + hp.n;
  hp.y_span = hp.rows * hp.n;
  hp.hbits_span = hb.numel();
  hp.m = static_cast<int32_t>(c.plan.m);
  hp.log2p = c.plan.log2p;
  hp.hwords = static_cast<int32_t>((c.plan.m + 31) / 32);
  hp.scale = static_cast<float>(scale);
  hp.dtype = to_dtype(x);
  const int64_t esize = x.element_size();
  const int64_t E = hp.log2p >= 3 ? 8 : (int64_t(1) << hp.log2p);
  const int64_t align = std::min<int64_t>(16, E * esize);
  hp.vec_ok = reinterpret_cast<uintptr_t>(hp.x) % align == 0 && reinterpret_cast<uintptr_t>(hp.y) % align == 0 &&
              (hp.x_row_stride * esize) % align == 0 && (hp.n * esize) % align == 0;
  launch(hp);
  return c.out;
}

}  // namespace lt::hadamard
