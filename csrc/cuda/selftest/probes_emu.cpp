// Emulator launchers of the self-test kernels, registered for CPU tensors: the probes as
// longtune_test::* (CPU) and the deliberately wrong kernels as longtune_emu::faulty_kernel.
#include <torch/library.h>

#include "cuda/common/emu_glue.h"
#include "cuda/selftest/probes.cuh"
#include "cuda/selftest/probes_host.h"

namespace lt::selftest {

constexpr const char* kNs = "longtune_test";  // the probes' op namespace

void probe_emu(Probe which, const ProbeArgs& a) {
  switch (which) {
    case Probe::Mma: {
      const MmaProbe p{simt::make_gptr(static_cast<const uint32_t*>(a.in), 320, "in"),
                       simt::make_gptr(static_cast<float*>(a.out), 128, "out"), static_cast<MmaKind>(a.kind)};
      emu_launch("mma_probe", "mma_probe", {1, 1, 1}, {32, 1, 1}, 0, [&p] { mma_probe(p); }, kNs);
      break;
    }
    case Probe::Ldmatrix: {
      const LdmatrixProbe p{simt::make_gptr(static_cast<const uint16_t*>(a.in), a.elems, "tile"),
                            simt::make_gptr(static_cast<const int32_t*>(a.arg), 32, "rows"),
                            simt::make_gptr(static_cast<uint32_t*>(a.out), 128, "out"),
                            a.elems,
                            a.nmat,
                            a.trans};
      emu_launch(
          "ldmatrix_probe", "ldmatrix_probe", {1, 1, 1}, {32, 1, 1}, size_t(a.elems) * 2, [&p] { ldmatrix_probe(p); },
          kNs);
      break;
    }
    case Probe::Shfl: {
      const ShflProbe p{simt::make_gptr(static_cast<const int32_t*>(a.in), 32, "values"),
                        simt::make_gptr(static_cast<const int32_t*>(a.arg), 32, "arg"),
                        simt::make_gptr(static_cast<int32_t*>(a.out), 32, "out"), static_cast<ShflKind>(a.kind),
                        a.width};
      emu_launch("shfl_probe", "shfl_probe", {1, 1, 1}, {32, 1, 1}, 0, [&p] { shfl_probe(p); }, kNs);
      break;
    }
  }
}

namespace {
at::Tensor mma(const at::Tensor& in, int64_t kind) { return mma_probe_op(in, kind, probe_emu); }
at::Tensor ldm(const at::Tensor& tile, const at::Tensor& rows, int64_t nmat, bool trans) {
  return ldmatrix_probe_op(tile, rows, nmat, trans, probe_emu);
}
at::Tensor shfl(const at::Tensor& v, const at::Tensor& arg, int64_t kind, int64_t width) {
  return shfl_probe_op(v, arg, kind, width, probe_emu);
}

// faulty_kernel(x float [threads], which) -> float [threads]; raises with the emulator's report
at::Tensor faulty(const at::Tensor& x, int64_t which) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 && x.is_contiguous() && x.numel() >= 32 &&
                  x.numel() <= 1024 && x.numel() % 4 == 0,
              "faulty_kernel: x must be a contiguous float32 vector of 32..1024 elements (multiple of 4)");
  TORCH_CHECK(which >= 0 && which <= 13, "faulty_kernel: which must be in [0, 13]");
  at::Tensor y = at::zeros_like(x);
  const int64_t n = x.numel();
  const bool two = which >= kFaultyTwoBlocks;  // two blocks of n / 2 threads
  const uint32_t nt = static_cast<uint32_t>(two ? n / 2 : n);
  const FaultyParams p{simt::make_gptr(x.data_ptr<float>(), n, "x"), simt::make_gptr(y.data_ptr<float>(), n, "y"),
                       static_cast<Faulty>(which)};
  emu_launch("faulty_kernel", "faulty_kernel", {two ? 2u : 1u, 1, 1}, {nt, 1, 1}, size_t(nt) * sizeof(float),
             [&p] { faulty_body(p); });
  return y;
}
}  // namespace
}  // namespace lt::selftest

TORCH_LIBRARY_IMPL(longtune_test, CPU, m) {
  m.impl("mma_probe", &lt::selftest::mma);
  m.impl("ldmatrix_probe", &lt::selftest::ldm);
  m.impl("shfl_probe", &lt::selftest::shfl);
}

TORCH_LIBRARY_IMPL(longtune_emu, CPU, m) { m.impl("faulty_kernel", &lt::selftest::faulty); }
