// The element types the device kernels are instantiated for, and the one static switch from the
// runtime tag to the storage type. Plain C++ (no torch, no CUDA types): included by the nvcc launch
// files, the emulator launch files and the host glue alike.
#pragma once
#include <cstdint>

#include "common/simt/types.h"

namespace lt {

// Element type of a kernel's floating-point tensors (the accumulators are fp32 regardless).
enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

// Storage type of each tag: float, or the 16-bit storage structs of the intrinsics layer.
template <DType D>
struct DTypeStorage;
template <>
struct DTypeStorage<DType::F32> {
  using type = float;
};
template <>
struct DTypeStorage<DType::F16> {
  using type = simt::f16;
};
template <>
struct DTypeStorage<DType::BF16> {
  using type = simt::bf16;
};
template <DType D>
using storage_t = typename DTypeStorage<D>::type;

inline const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
  }
  return "?";
}

// The static switch: calls f.template operator()<T>() with T = storage_t<dt> when dt is one of
// `Allowed` (only those are instantiated); returns false, calling nothing, for any other tag.
template <DType... Allowed, class F>
bool dtype_switch(DType dt, F&& f) {
  return ((dt == Allowed ? (f.template operator()<storage_t<Allowed>>(), true) : false) || ...);
}

// dtype_switch over every tag (f32, f16, bf16).
template <class F>
void dispatch_dtype(DType dt, F&& f) {
  dtype_switch<DType::F32, DType::F16, DType::BF16>(dt, f);
}

// Static switch over the chunk width of the row kernels (elements a thread loads at once):
// calls f.template operator()<E>() for E = width in {1, 2, 4}, otherwise E = 8.
template <class F>
void dispatch_chunk_width(int32_t width, F&& f) {
  switch (width) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 4: f.template operator()<4>(); break;
    default: f.template operator()<8>(); break;
  }
}

// Both switches: f.template operator()<T, E>() for the storage type of dt and the chunk width.
template <class F>
void dispatch_dtype_chunk(DType dt, int32_t width, F&& f) {
  dispatch_dtype(dt, [&]<class T>() { dispatch_chunk_width(width, [&]<int E>() { f.template operator()<T, E>(); }); });
}

}  // namespace lt
