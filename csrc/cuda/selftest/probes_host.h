// Torch-level glue of the self-test ops (longtune_test::*), shared by the CPU (emulator) and the
// CUDA registrations: argument checks, output allocation, ProbeArgs.
#pragma once
#include <ATen/ATen.h>

#include "common/checks.h"
#include "cuda/selftest/probes_params.h"

namespace lt::selftest {

inline void check_probe_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dt,
                               int64_t numel) {
  LT_CHECK(op, t.scalar_type() == dt, name, " must be ", dt, ", got ", t.scalar_type());
  LT_CHECK(op, t.is_contiguous() && t.numel() == numel, name, " must be contiguous with ", numel, " elements, got ",
           t.sizes());
}

// mma_probe(in int32 [32,10], kind) -> float [32,4]
template <class Run>
at::Tensor mma_probe_op(const at::Tensor& in, int64_t kind, Run&& run) {
  check_probe_tensor("mma_probe", "in", in, at::kInt, 320);
  LT_CHECK("mma_probe", kind >= 0 && kind <= 2, "kind must be 0 (f16 m16n8k16), 1 (bf16 m16n8k16) or 2 (f16 m16n8k8)");
  at::Tensor out = at::zeros({32, 4}, in.options().dtype(at::kFloat));
  ProbeArgs a;
  a.in = in.data_ptr();
  a.out = out.data_ptr();
  a.kind = static_cast<int32_t>(kind);
  run(Probe::Mma, a);
  return out;
}

// ldmatrix_probe(tile int16 [E], rows int32 [32], nmat, trans) -> int64 [32,4] (32-bit registers)
template <class Run>
at::Tensor ldmatrix_probe_op(const at::Tensor& tile, const at::Tensor& rows, int64_t nmat, bool trans, Run&& run) {
  LT_CHECK("ldmatrix_probe", tile.scalar_type() == at::kShort && tile.is_contiguous() && tile.dim() == 1,
           "tile must be a contiguous 1-D int16 tensor");
  check_probe_tensor("ldmatrix_probe", "rows", rows, at::kInt, 32);
  LT_CHECK("ldmatrix_probe", nmat == 1 || nmat == 2 || nmat == 4, "nmat must be 1, 2 or 4, got ", nmat);
  at::Tensor out = at::zeros({32, 4}, tile.options().dtype(at::kInt));
  ProbeArgs a;
  a.in = tile.data_ptr();
  a.arg = rows.data_ptr();
  a.out = out.data_ptr();
  a.elems = static_cast<int32_t>(tile.numel());
  a.nmat = static_cast<int32_t>(nmat);
  a.trans = trans;
  run(Probe::Ldmatrix, a);
  return out.to(at::kLong).bitwise_and(0xffffffffLL);
}

// shfl_probe(values int32 [32], arg int32 [32], kind, width) -> int32 [32]
template <class Run>
at::Tensor shfl_probe_op(const at::Tensor& values, const at::Tensor& arg, int64_t kind, int64_t width, Run&& run) {
  check_probe_tensor("shfl_probe", "values", values, at::kInt, 32);
  check_probe_tensor("shfl_probe", "arg", arg, at::kInt, 32);
  LT_CHECK("shfl_probe", kind >= 0 && kind <= 4, "kind must be 0 idx, 1 xor, 2 up, 3 down, 4 ballot");
  at::Tensor out = at::zeros({32}, values.options());
  ProbeArgs a;
  a.in = values.data_ptr();
  a.arg = arg.data_ptr();
  a.out = out.data_ptr();
  a.kind = static_cast<int32_t>(kind);
  a.width = static_cast<int32_t>(width);
  run(Probe::Shfl, a);
  return out;
}

}  // namespace lt::selftest
