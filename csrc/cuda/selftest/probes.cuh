// Self-test kernels of the intrinsics layer (device code on simt, so they run on a GPU and on the
// emulator alike):
//  - probes that expose one warp's raw fragments of mma.sync / ldmatrix / shuffles, so tests can
//    compare them with lane -> (row, col) tables written from the PTX ISA documentation, and
//    gpu-check can compare the emulator with the hardware;
//  - deliberately wrong kernels (emulator only) that the emulator must report, not pass or hang.
#pragma once
#include "common/simt/simt.h"

namespace lt::selftest {

enum class MmaKind : int32_t { F16_16816 = 0, BF16_16816 = 1, F16_1688 = 2 };

struct MmaProbe {
  simt::gptr<const uint32_t> in;  // [32][10]: A regs (4), B regs (2), C as float bits (4)
  simt::gptr<float> out;          // [32][4]: D
  MmaKind kind;
};

LT_DEV void mma_probe(const MmaProbe& p) {
  const uint32_t lane = simt::lane_id();
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) a[i] = p.in[lane * 10 + i];
  for (int i = 0; i < 2; ++i) b[i] = p.in[lane * 10 + 4 + i];
  for (int i = 0; i < 4; ++i) c[i] = simt::bits_float(p.in[lane * 10 + 6 + i]);
  if (p.kind == MmaKind::F16_16816) {
    simt::mma_m16n8k16_f16(d, a, b, c);
  } else if (p.kind == MmaKind::BF16_16816) {
    simt::mma_m16n8k16_bf16(d, a, b, c);
  } else {
    const uint32_t a2[2] = {a[0], a[1]};
    const uint32_t b1[1] = {b[0]};
    simt::mma_m16n8k8_f16(d, a2, b1, c);
  }
  for (int i = 0; i < 4; ++i) p.out[lane * 4 + i] = d[i];
}

struct LdmatrixProbe {
  simt::gptr<const uint16_t> tile;  // `elems` 16-bit values copied to shared memory first
  simt::gptr<const int32_t> row;    // [32]: element offset of each lane's row address
  simt::gptr<uint32_t> out;         // [32][4]
  int32_t elems, nmat;
  bool trans;
};

LT_DEV void ldmatrix_probe(const LdmatrixProbe& p) {
  const uint32_t lane = simt::lane_id();
  simt::sptr<uint16_t> s = simt::dynamic_smem<uint16_t>();
  for (int32_t i = lane; i < p.elems; i += 32) s[i] = p.tile[i];
  simt::sync_block();
  simt::sptr<uint16_t> r = s + p.row[lane];
  uint32_t v[4] = {0, 0, 0, 0};
  if (p.nmat == 1) {
    uint32_t t[1];
    if (p.trans) simt::ldmatrix_x1<true>(t, r);
    else simt::ldmatrix_x1<false>(t, r);
    v[0] = t[0];
  } else if (p.nmat == 2) {
    uint32_t t[2];
    if (p.trans) simt::ldmatrix_x2<true>(t, r);
    else simt::ldmatrix_x2<false>(t, r);
    v[0] = t[0];
    v[1] = t[1];
  } else {
    if (p.trans) simt::ldmatrix_x4<true>(v, r);
    else simt::ldmatrix_x4<false>(v, r);
  }
  for (int i = 0; i < 4; ++i) p.out[lane * 4 + i] = v[i];
}

enum class ShflKind : int32_t { Idx = 0, Xor = 1, Up = 2, Down = 3, Ballot = 4 };

struct ShflProbe {
  simt::gptr<const int32_t> in;   // [32] values (Ballot: predicates)
  simt::gptr<const int32_t> arg;  // [32] per-lane src / lane mask / delta
  simt::gptr<int32_t> out;        // [32]
  ShflKind kind;
  int32_t width;
};

LT_DEV void shfl_probe(const ShflProbe& p) {
  const uint32_t lane = simt::lane_id();
  const int32_t v = p.in[lane], a = p.arg[lane];
  int32_t r = 0;
  switch (p.kind) {
    case ShflKind::Idx: r = simt::shfl(simt::kFullMask, v, a, p.width); break;
    case ShflKind::Xor: r = simt::shfl_xor(simt::kFullMask, v, a, p.width); break;
    case ShflKind::Up: r = simt::shfl_up(simt::kFullMask, v, unsigned(a), p.width); break;
    case ShflKind::Down: r = simt::shfl_down(simt::kFullMask, v, unsigned(a), p.width); break;
    case ShflKind::Ballot: r = static_cast<int32_t>(simt::ballot(simt::kFullMask, v != 0)); break;
  }
  p.out[lane] = r;
}

// ------------------------------------------------------------ deliberately wrong kernels
// (emulator only: on a GPU they hang, corrupt memory or return garbage)
enum class Faulty : int32_t {
  MissingBarrier = 0,     // write smem, read a neighbour's slot with no sync_block in between
  FixedBarrier = 1,       // the same with the barrier: must pass
  DivergentBarrier = 2,   // half the block skips a sync_block
  SmemOutOfBounds = 3,    // one thread writes one element past the requested shared memory
  HalfWarpShuffle = 4,    // lanes 0-15 shuffle with a full mask, lanes 16-31 never do
  GlobalOutOfBounds = 5,  // reads one element past the end of a tensor
  CpAsyncEarlyRead = 6,   // reads cp.async data before cp_async_wait
  MisalignedVector = 7,   // 128-bit load from an address that is not 16-byte aligned
  OverwriteAfterReads = 8,  // after a barrier each thread reads its neighbour's slot and its own,
                            // then overwrites its own with no sync_block: the writer is the last
                            // reader of its slot, the neighbour read it before
  // two-block launches (each block has half of x's threads; g = global thread index):
  GlobalWriteWrite = 9,  // both blocks store y[t] with plain stores
  GlobalReadOther = 10,  // each block stores y[g], then reads the other block's y slot
  GlobalAtomicAdd = 11,  // both blocks atomic_add into y[t]: must pass
  GlobalDisjoint = 12,  // each block stores only its own y[g]: must pass
  GlobalAtomicThenRead = 13,  // atomic_add into y[t], then a plain read of y[t]
};
constexpr int32_t kFaultyTwoBlocks = 9;  // Faulty values from here on launch two blocks

struct FaultyParams {
  simt::gptr<const float> x;  // block_dim.x floats
  simt::gptr<float> y;  // block_dim.x floats
  Faulty which;
};

LT_DEV void faulty_body(const FaultyParams& p) {
  const uint32_t t = simt::thread_linear(), nt = simt::block_dim().x;
  simt::sptr<float> s = simt::dynamic_smem<float>();
  switch (p.which) {
    case Faulty::MissingBarrier:
    case Faulty::FixedBarrier: {
      s[t] = p.x[t];
      if (p.which == Faulty::FixedBarrier) simt::sync_block();
      p.y[t] = s[(t + 1) % nt];
      break;
    }
    case Faulty::DivergentBarrier:
      if (t < nt / 2) simt::sync_block();
      p.y[t] = p.x[t];
      break;
    case Faulty::SmemOutOfBounds:
      s[t] = p.x[t];
      if (t == 5) s[nt] = 1.f;  // the launch asked for nt floats
      simt::sync_block();
      p.y[t] = s[t];
      break;
    case Faulty::HalfWarpShuffle: {
      float v = p.x[t];
      if (simt::lane_id() < 16) v += simt::shfl_xor(simt::kFullMask, v, 1);
      p.y[t] = v;
      break;
    }
    case Faulty::GlobalOutOfBounds: p.y[t] = p.x[t + 1]; break;
    case Faulty::CpAsyncEarlyRead: {
      float early = 0.f;
      if (t < nt / 4) {
        simt::cp_async_16(s + 4 * t, p.x + 4 * t);
        simt::cp_async_commit();
        early = s[4 * t];  // the copy's own destination, read before cp_async_wait
        simt::cp_async_wait<0>();
      }
      simt::sync_block();
      p.y[t] = early + s[t];
      break;
    }
    case Faulty::MisalignedVector: {
      float v[4];
      if (t == 0) simt::ld_vec<4>(p.x, 1, v);
      p.y[t] = p.x[t];
      break;
    }
    case Faulty::GlobalWriteWrite: p.y[t] = p.x[simt::block_idx().x * nt + t]; break;
    case Faulty::GlobalReadOther: {
      const uint32_t g = simt::block_idx().x * nt + t;
      p.y[g] = p.x[g];
      simt::sync_block();
      const float o = p.y[(g + nt) % (2 * nt)];
      p.y[g] = p.y[g] + 0.f * o;
      break;
    }
    case Faulty::GlobalAtomicAdd: simt::atomic_add(p.y + t, float(p.x[simt::block_idx().x * nt + t])); break;
    case Faulty::GlobalDisjoint: p.y[simt::block_idx().x * nt + t] = p.x[simt::block_idx().x * nt + t]; break;
    case Faulty::GlobalAtomicThenRead: {
      simt::atomic_add(p.y + t, float(p.x[simt::block_idx().x * nt + t]));
      const float v = p.y[t];
      if (v != v) p.y[nt + t] = v;
      break;
    }
    case Faulty::OverwriteAfterReads: {
      s[t] = p.x[t];
      simt::sync_block();
      const float a = s[(t + 1) % nt], b = s[t];
      s[t] = a + b;
      p.y[t] = a;
      break;
    }
  }
}

}  // namespace lt::selftest
