// Torch-side glue of the emulator bindings (*_emu.cpp): the one wrapper that runs device code on
// the CPU emulator (csrc/emu) and turns its report into a torch error naming the op.
#pragma once
#include <ATen/ATen.h>

#include <exception>

#include "cuda/common/launch.h"
#include "cuda/common/torch_glue.h"
#include "emu/runtime.h"

namespace lt {

// The emulator runs device code on host memory: every tensor it is given must be a CPU tensor.
inline void check_emu_input(const char* op, const at::Tensor& t, const char* ns = "longtune_emu") {
  TORCH_CHECK(t.device().is_cpu(), ns, ".", op, ": the emulator runs on CPU tensors, got ", t.device());
}

// Runs `body` (every thread of the grid) on the emulator; a report (out-of-bounds access, barrier
// divergence, ...) raises "<ns>.<op>: <report>".
template <class Body>
void emu_launch(const char* op, const char* kernel, simt::Dim3 grid, simt::Dim3 block, size_t smem, const Body& body,
                const char* ns = "longtune_emu") {
  try {
    emu::launch(kernel, grid, block, smem, body);
  } catch (const std::exception& e) { TORCH_CHECK(false, ns, ".", op, ": ", e.what()); }
}
template <class Body>
void emu_launch(const char* op, const char* kernel, const LaunchCfg& cfg, const Body& body,
                const char* ns = "longtune_emu") {
  emu_launch(op, kernel, cfg.grid, cfg.block, cfg.smem, body, ns);
}

}  // namespace lt
