// The device-intrinsics layer: everything a longtune kernel body may use besides plain C++.
// With nvcc the functions compile to the real instructions (built-ins / inline PTX); with the host
// compiler they run on the CPU emulator in csrc/emu (concurrent threads, real barriers, warp
// rendezvous, PTX-exact fragment layouts, bounds and barrier checks).
//
// Kernel code rules (see docs/design.md, "Writing a kernel for both backends"):
//  - device code lives in headers; kernel bodies are `template <...> LT_DEV void body(Params)`
//  - global memory through simt::gptr<T>, shared memory through simt::sptr<T> from
//    simt::dynamic_smem<T>() (no __shared__ in kernel bodies)
//  - thread/block ids, barriers, shuffles, votes, atomics, cp.async, ldmatrix, mma only via simt::
#pragma once
#include "common/simt/types.h"

#if defined(__CUDACC__)
#include "common/simt/cuda_backend.h"
#else
#include "common/simt/emu_backend.h"
#endif

namespace lt::simt {

constexpr uint32_t kFullMask = 0xffffffffu;

LT_DEV uint32_t lane_id() { return thread_linear() & 31u; }
LT_DEV uint32_t warp_id() { return thread_linear() >> 5; }

}  // namespace lt::simt
