// CPU kernels of rotated fake quantization: one pass per row - convert once into an fp32 row
// buffer, rotate in place (the same FWHT primitives as the Hadamard kernel, so the rotated values
// are bit-identical to longtune.hadamard_transform's), per-group statistics, then quantize-
// dequantize / mask / codes on the way out. Rows run in parallel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/quant_host.h"
#include "cpu/fwht_cpu.h"

namespace lt::quant {
namespace {

enum class Mode { Fake, Mask, Codes };

// Hot per-group loops, compiled per instruction set (SSE4.1+ turns the round-half-even into one
// vector instruction; the baseline would call libm per element).
LT_MULTIVERSION void group_stats(const float* __restrict v, int64_t len, float* amax_o, float* mn_o, float* mx_o) {
  float amax = 0.f, mn = v[0], mx = v[0];
  int nan = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float a = v[i] < 0.f ? -v[i] : v[i];
    amax = a > amax ? a : amax;
    mn = v[i] < mn ? v[i] : mn;
    mx = v[i] > mx ? v[i] : mx;
    nan |= v[i] != v[i];
  }
  const float q = __builtin_nanf("");  // a NaN in the group: NaN statistics (as torch.amax / amin)
  *amax_o = nan ? q : amax;
  *mn_o = nan ? q : mn;
  *mx_o = nan ? q : mx;
}

// In place: v[i] <- dequant(code(v[i])) (codes = false) or code(v[i]) (codes = true).
LT_MULTIVERSION void quantize_group(float* __restrict v, int64_t len, QuantCfg cfg, GroupParams gp, bool codes) {
  const float lo = qmin(cfg), hi = qmax(cfg);
  for (int64_t i = 0; i < len; ++i) {
    float q = __builtin_rintf(v[i] / gp.scale) + gp.zero;
    q = q < lo ? lo : (q > hi ? hi : q);
    v[i] = codes ? q : (q - gp.zero) * gp.scale;
  }
}

struct Outputs {
  at::Tensor y;       // Fake: x dtype; Mask: grad dtype
  at::Tensor codes;   // Codes: int8 / uint8
  at::Tensor scales;  // Codes: float [R, groups]
  at::Tensor zeros;
};

template <typename scalar_t>
void run_rows(const Args& a, const at::Tensor& rows, const at::Tensor& pre_rotated, const at::Tensor& grad_rows,
              Mode mode, Outputs& o) {
  const int64_t R = rows.size(0), n = a.n, xs = rows.stride(0);
  const scalar_t* x = rows.data_ptr<scalar_t>();
  const float* pre = pre_rotated.defined() ? pre_rotated.data_ptr<float>() : nullptr;
  const scalar_t* g = grad_rows.defined() ? grad_rows.data_ptr<scalar_t>() : nullptr;
  const int64_t gs = grad_rows.defined() ? grad_rows.stride(0) : 0;
  const int64_t P = int64_t(1) << a.hplan.log2p;
  const bool fused_rotation = a.rotate && !pre;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / n);
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(n);
    for (int64_t r = r0; r < r1; ++r) {
      float* b = buf.data();
      if (pre) {
        std::memcpy(b, pre + r * n, n * sizeof(float));
      } else {
        for (int64_t i = 0; i < n; ++i) b[i] = static_cast<float>(x[r * xs + i]);
        if (fused_rotation) {
          cpu::fwht_segments(b, n / P, P);
          const float rs = static_cast<float>(a.rscale);  // as the Hadamard kernel rounds its scale
          for (int64_t i = 0; i < n; ++i) b[i] = b[i] * rs;
        }
      }
      for (int64_t grp = 0; grp < a.ngroups; ++grp) {
        float* v = b + grp * a.group;
        float amax, mn, mx;
        group_stats(v, a.group, &amax, &mn, &mx);
        const GroupParams gp = group_params(a.cfg, amax, mn, mx);
        const int64_t base = r * n + grp * a.group;
        switch (mode) {
          case Mode::Fake: {
            quantize_group(v, a.group, a.cfg, gp, false);
            scalar_t* y = o.y.data_ptr<scalar_t>() + base;
            for (int64_t i = 0; i < a.group; ++i) y[i] = static_cast<scalar_t>(v[i]);
            break;
          }
          case Mode::Mask: {
            scalar_t* y = o.y.data_ptr<scalar_t>() + base;
            const scalar_t* gr = g + r * gs + grp * a.group;
            for (int64_t i = 0; i < a.group; ++i) y[i] = in_range(a.cfg, gp, v[i]) ? gr[i] : static_cast<scalar_t>(0.f);
            break;
          }
          case Mode::Codes: {
            quantize_group(v, a.group, a.cfg, gp, true);
            if (a.cfg.symmetric) {
              int8_t* c = o.codes.data_ptr<int8_t>() + base;
              for (int64_t i = 0; i < a.group; ++i) c[i] = static_cast<int8_t>(storable_code(v[i]));
            } else {
              uint8_t* c = o.codes.data_ptr<uint8_t>() + base;
              for (int64_t i = 0; i < a.group; ++i) c[i] = static_cast<uint8_t>(storable_code(v[i]));
            }
            o.scales.data_ptr<float>()[r * a.ngroups + grp] = gp.scale;
            o.zeros.data_ptr<float>()[r * a.ngroups + grp] = gp.zero;
            break;
          }
        }
      }
    }
  });
}

at::Tensor rows_of(const at::Tensor& t, int64_t n) {
  at::Tensor r = t.reshape({-1, n});
  return r.stride(1) == 1 ? r : r.contiguous();
}

// For a rotation with a non-power-of-two factor (m > 1) the rotated rows come from the Hadamard
// op itself (its fp64 factor GEMM), then the quantizer runs on them: two passes, same values.
at::Tensor pre_rotate(const at::Tensor& x, const Args& a) {
  if (!a.rotate || a.hplan.m == 1) return at::Tensor();
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("longtune::hadamard_transform", "")
                .typed<at::Tensor(const at::Tensor&, double)>();
  return op.call(x.to(at::kFloat).reshape({-1, a.h}), a.rscale).reshape({-1, a.n});
}

void dispatch(const Args& a, const at::Tensor& x, const at::Tensor& grad, Mode mode, Outputs& o) {
  const at::Tensor rows = rows_of(x, a.n);
  const at::Tensor pre = pre_rotate(x, a);
  const at::Tensor grows = grad.defined() ? rows_of(grad, a.n) : at::Tensor();
  switch (x.scalar_type()) {
    case at::kFloat: run_rows<float>(a, rows, pre, grows, mode, o); break;
    case at::kHalf: run_rows<at::Half>(a, rows, pre, grows, mode, o); break;
    case at::kBFloat16: run_rows<at::BFloat16>(a, rows, pre, grows, mode, o); break;
    default: TORCH_INTERNAL_ASSERT(false);
  }
}

at::Tensor fake_quant_cpu(const at::Tensor& x, int64_t bits, c10::string_view granularity, int64_t group_size,
                          bool symmetric, double clip, bool rotate, int64_t hsize, c10::string_view ste) {
  const Args a = check_args("rotate_fake_quant", x, bits, std::string(granularity), group_size, symmetric, clip, rotate,
                            hsize, std::string(ste), false);
  Outputs o;
  o.y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel()) dispatch(a, x, at::Tensor(), Mode::Fake, o);
  return o.y;
}

at::Tensor fake_quant_backward_cpu(const at::Tensor& grad, const at::Tensor& x, int64_t bits,
                                   c10::string_view granularity, int64_t group_size, bool symmetric, double clip,
                                   bool rotate, int64_t hsize, c10::string_view ste) {
  const char* op = "rotate_fake_quant_backward";
  const Args a = check_args(op, x, bits, std::string(granularity), group_size, symmetric, clip, rotate, hsize,
                            std::string(ste), false);
  check_grad(op, grad, x);
  return ste_backward(
      a, grad, x,
      [&] {
        Outputs o;
        o.y = at::empty(x.sizes(), grad.options().memory_format(at::MemoryFormat::Contiguous));
        dispatch(a, x, grad, Mode::Mask, o);
        return o.y;
      },
      "longtune::hadamard_transform_backward");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x, int64_t bits,
                                                            c10::string_view granularity, int64_t group_size,
                                                            bool symmetric, double clip, bool rotate, int64_t hsize) {
  const Args a = check_args("rotate_quantize", x, bits, std::string(granularity), group_size, symmetric, clip, rotate,
                            hsize, "identity", false);
  Outputs o;
  o.codes = at::empty(x.sizes(), x.options().dtype(symmetric ? at::kChar : at::kByte));
  o.scales = group_shape_empty(x, a);
  o.zeros = group_shape_empty(x, a);
  if (x.numel()) dispatch(a, x, at::Tensor(), Mode::Codes, o);
  return {o.codes, o.scales, o.zeros};
}

}  // namespace
}  // namespace lt::quant

TORCH_LIBRARY_IMPL(longtune, CPU, m) {
  m.impl("rotate_fake_quant", &lt::quant::fake_quant_cpu);
  m.impl("rotate_fake_quant_backward", &lt::quant::fake_quant_backward_cpu);
  m.impl("rotate_quantize", &lt::quant::quantize_cpu);
}
