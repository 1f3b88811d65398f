// Host glue shared by the CUDA and the emulator bindings of the rotated-quantization kernels:
// the same checks (common/quant_host.h), the same params, the same backward composition; only
// the launcher and the Hadamard op used to rotate gradients back differ.
#pragma once
#include <ATen/ATen.h>
#ifdef LONGTUNE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

#include <string>
#include <tuple>

#include "common/quant_host.h"
#include "cuda/common/torch_glue.h"
#include "cuda/hadamard/hadamard_device_op.h"
#include "cuda/quant/quant_params.h"

namespace lt::quant {

inline int32_t chunk_for(const Args& a) {
  if (a.rotate) return a.hplan.log2p >= 3 ? 8 : (1 << a.hplan.log2p);
  for (int32_t e : {8, 4, 2})
    if (a.n % e == 0) return e;
  return 1;
}

// Dynamic shared memory one block may use on x's device: the GPU's opt-in maximum (sm_80: 163 KiB,
// sm_90: 227 KiB); on the emulator (CPU tensors) the largest of the built architectures', 227 KiB.
inline size_t smem_limit(const at::Tensor& x) {
#ifdef LONGTUNE_WITH_CUDA
  if (x.is_cuda()) return at::cuda::getDeviceProperties(x.get_device())->sharedMemPerBlockOptin;
#endif
  return 227 * 1024;
}

struct DeviceOut {
  at::Tensor y, codes, scales, zeros;
};

// Fills the params and calls launch(QuantParams) for the forward modes (Fake, Codes), or
// launch(QuantBwdParams) with `grad` for the backward (Mask).
template <bool kBackward, class Launch>
void run_quant_device(const char* op, const Args& a, const at::Tensor& x, const at::Tensor& grad, KMode mode,
                      DeviceOut& o, Launch&& launch) {
  const size_t smem = static_cast<size_t>(a.n + 2 * a.ngroups) * sizeof(float);
  const size_t limit = smem_limit(x);
  LT_CHECK(op, smem <= limit, "the GPU kernel keeps a row and its group scales in shared memory: n=", a.n, " with ",
           a.ngroups, " groups needs ", smem, " bytes (> ", limit, " bytes per block on this device); use a larger ",
           "group_size");
  const at::Tensor rows = [&] {
    at::Tensor r = x.reshape({-1, a.n});
    return r.stride(1) == 1 ? r : r.contiguous();
  }();
  QuantParams qp;
  qp.x = rows.data_ptr();
  qp.rows = rows.size(0);
  qp.n = a.n;
  qp.x_row_stride = rows.stride(0);
  qp.x_span = (qp.rows - 1) * qp.x_row_stride + qp.n;
  at::Tensor hb;
  if (a.rotate && a.hplan.m > 1) {
    hb = hadamard::sign_table(a.hplan.m, /*transpose=*/false, x.device());
    qp.hbits = reinterpret_cast<const uint32_t*>(hb.data_ptr<int32_t>());
    qp.hbits_span = hb.numel();
  }
  qp.h = a.rotate ? a.h : 1;
  qp.group = a.group;
  qp.ngroups = a.ngroups;
  qp.m = static_cast<int32_t>(a.hplan.m);
  qp.log2p = a.hplan.log2p;
  qp.hwords = static_cast<int32_t>((a.hplan.m + 31) / 32);
  qp.rotate = a.rotate;
  qp.rscale = static_cast<float>(a.rscale);
  qp.cfg = a.cfg;
  qp.mode = mode;
  qp.dtype = to_dtype(x);
  qp.chunk = chunk_for(a);
  if (mode == KMode::Codes) {
    qp.codes = o.codes.data_ptr();
    qp.scales = o.scales.data_ptr<float>();
    qp.zeros = o.zeros.data_ptr<float>();
  } else {
    qp.y = o.y.data_ptr();
  }
  const int64_t es = x.element_size(), align = std::min<int64_t>(16, qp.chunk * es);
  auto aligned = [&](const void* p) { return reinterpret_cast<uintptr_t>(p) % align == 0; };
  qp.vec_ok = aligned(qp.x) && (qp.x_row_stride * es) % align == 0 && (qp.n * es) % align == 0 &&
              (qp.y == nullptr || aligned(qp.y));
  if constexpr (kBackward) {
    at::Tensor grows = grad.reshape({-1, a.n});
    if (grows.stride(1) != 1) grows = grows.contiguous();
    QuantBwdParams bp;
    static_cast<QuantParams&>(bp) = qp;
    bp.grad = grows.data_ptr();
    bp.grad_row_stride = grows.stride(0);
    bp.grad_span = (bp.rows - 1) * bp.grad_row_stride + bp.n;
    launch(bp);
  } else {
    launch(qp);
  }
}

template <class Launch>
at::Tensor fake_quant_device(const at::Tensor& x, int64_t bits, const std::string& gran, int64_t gsize, bool sym,
                             double clip, bool rotate, int64_t hsize, const std::string& ste, Launch&& launch) {
  const Args a = check_args("rotate_fake_quant", x, bits, gran, gsize, sym, clip, rotate, hsize, ste, false);
  DeviceOut o;
  o.y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel()) run_quant_device<false>("rotate_fake_quant", a, x, at::Tensor(), KMode::Fake, o, launch);
  return o.y;
}

template <class Launch>
at::Tensor fake_quant_backward_device(const at::Tensor& grad, const at::Tensor& x, int64_t bits,
                                      const std::string& gran, int64_t gsize, bool sym, double clip, bool rotate,
                                      int64_t hsize, const std::string& ste, const char* hadamard_bwd_op,
                                      Launch&& launch) {
  const char* op = "rotate_fake_quant_backward";
  const Args a = check_args(op, x, bits, gran, gsize, sym, clip, rotate, hsize, ste, false);
  check_grad(op, grad, x);
  return ste_backward(
      a, grad, x,
      [&] {
        DeviceOut o;
        o.y = at::empty(x.sizes(), grad.options().memory_format(at::MemoryFormat::Contiguous));
        run_quant_device<true>(op, a, x, grad, KMode::Mask, o, launch);
        return o.y;
      },
      hadamard_bwd_op);
}

template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_device(const at::Tensor& x, int64_t bits,
                                                               const std::string& gran, int64_t gsize, bool sym,
                                                               double clip, bool rotate, int64_t hsize,
                                                               Launch&& launch) {
  const Args a = check_args("rotate_quantize", x, bits, gran, gsize, sym, clip, rotate, hsize, "identity", false);
  DeviceOut o;
  o.codes = at::empty(x.sizes(), x.options().dtype(sym ? at::kChar : at::kByte));
  o.scales = group_shape_empty(x, a);
  o.zeros = group_shape_empty(x, a);
  if (x.numel()) run_quant_device<false>("rotate_quantize", a, x, at::Tensor(), KMode::Codes, o, launch);
  return {o.codes, o.scales, o.zeros};
}

}  // namespace lt::quant
