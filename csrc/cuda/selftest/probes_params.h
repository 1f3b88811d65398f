// Raw-pointer entry points of the self-test kernels (no torch, no CUDA types). Pointers are
// device pointers for the CUDA launcher (probes_launch.cu), which returns nullptr on success, else
// the CUDA error string, and host pointers for the emulator one (probes_emu.cpp), which raises the
// emulator's report as a torch error.
#pragma once
#include <cstdint>

namespace lt::selftest {

struct ProbeArgs {
  const void* in = nullptr;   // mma: uint32 [32][10]; ldmatrix: uint16 tile; shfl: int32 [32]
  const void* arg = nullptr;  // ldmatrix: int32 [32] row offsets; shfl: int32 [32]
  void* out = nullptr;        // mma: float [32][4]; ldmatrix: uint32 [32][4]; shfl: int32 [32]
  int32_t kind = 0;           // MmaKind / ShflKind
  int32_t elems = 0;          // ldmatrix tile elements
  int32_t nmat = 1;           // ldmatrix x1 / x2 / x4
  int32_t width = 32;         // shuffle width
  bool trans = false;
};

enum class Probe : int32_t { Mma = 0, Ldmatrix = 1, Shfl = 2 };

const char* probe_cuda(Probe which, const ProbeArgs& a, void* stream);
void probe_emu(Probe which, const ProbeArgs& a);

}  // namespace lt::selftest
