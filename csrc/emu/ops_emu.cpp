// Schemas of the emulated CUDA kernels (torch.ops.longtune_emu.*): the same signatures as
// torch.ops.longtune.*, implemented on CPU tensors by running the CUDA device code on the
// emulator. Test-only; built when LONGTUNE_EMU=ON (the default).
#include <torch/library.h>

TORCH_LIBRARY(longtune_emu, m) {
  m.def("hadamard_transform(Tensor x, float scale) -> Tensor");
  m.def("hadamard_transform_backward(Tensor grad, float scale) -> Tensor");
  m.def("rotate_fake_quant(Tensor x, int bits, str granularity, int group_size, bool symmetric, "
        "float clip_ratio, bool rotate, int hadamard_size, str ste_mode) -> Tensor");
  m.def("rotate_fake_quant_backward(Tensor grad, Tensor x, int bits, str granularity, int group_size, "
        "bool symmetric, float clip_ratio, bool rotate, int hadamard_size, str ste_mode) -> Tensor");
  m.def("rotate_quantize(Tensor x, int bits, str granularity, int group_size, bool symmetric, "
        "float clip_ratio, bool rotate, int hadamard_size) -> (Tensor, Tensor, Tensor)");
  // Deliberately wrong kernels (csrc/cuda/selftest/probes.cuh): each must raise the emulator's report.
  m.def("faulty_kernel(Tensor x, int which) -> Tensor");
}
