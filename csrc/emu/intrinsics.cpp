// Emulated warp-collective intrinsics. Fragment layouts follow the PTX ISA documentation
// ("Matrix Fragments for mma.m16n8k16 / mma.m16n8k8", "ldmatrix"); tests/test_emu_layouts.py checks
// them against tables written independently from the same documentation.
#include <cstdio>
#include <cstring>
#include <string>

#include "common/simt/emu_backend.h"

namespace lt::simt::detail {
namespace {
std::string hex(uint32_t v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}
}  // namespace

void nop_fn(const emu::LaneIO*, emu::LaneIO*, uint32_t, uint32_t) {}

void shfl_fn(const emu::LaneIO* in, emu::LaneIO* out, uint32_t mask, uint32_t) {
  for (uint32_t lane = 0; lane < 32; ++lane) {
    if (!((mask >> lane) & 1u)) continue;
    const uint64_t kind = in[lane].w[2];
    const int64_t arg = static_cast<int64_t>(in[lane].w[1]);
    const int width = static_cast<int>(in[lane].w[3]);
    if (width < 1 || width > 32 || (width & (width - 1)))
      emu::fail_in_collective("shuffle width " + std::to_string(width) + " is not a power of two in [1, 32]");
    const int base = static_cast<int>(lane) & ~(width - 1);
    int src = static_cast<int>(lane);
    bool own = false;
    switch (kind) {
      case kShfl: src = base + static_cast<int>(arg & (width - 1)); break;
      case kShflXor:
        src = static_cast<int>(lane) ^ static_cast<int>(arg & 31);
        own = src >= base + width;  // later groups are out of reach: own value
        break;
      case kShflUp:
        src = static_cast<int>(lane) - static_cast<int>(arg);
        own = src < base;
        break;
      case kShflDown:
        src = static_cast<int>(lane) + static_cast<int>(arg);
        own = src >= base + width;
        break;
      default: emu::fail_in_collective("unknown shuffle kind");
    }
    if (own) src = static_cast<int>(lane);
    if (!((mask >> src) & 1u))
      emu::fail_in_collective("shuffle by lane " + std::to_string(lane) + " reads lane " + std::to_string(src) +
                              ", which is not in the mask " + hex(mask) + " (undefined value on a GPU)");
    out[lane].w[0] = in[src].w[0];
  }
}

void vote_fn(const emu::LaneIO* in, emu::LaneIO* out, uint32_t mask, uint32_t) {
  uint32_t bits = 0;
  for (uint32_t l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && in[l].w[0]) bits |= 1u << l;
  for (uint32_t l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) out[l].w[0] = bits;
}

void ldmatrix_fn(const emu::LaneIO* in, emu::LaneIO* out, uint32_t, uint32_t lanes) {
  if (lanes != 32) emu::fail_in_collective("ldmatrix needs a full warp of 32 lanes");
  const int nmat = static_cast<int>(in[0].w[1]);
  const bool trans = in[0].w[2] != 0;
  if (emu::counting()) emu::count_ldmatrix(size_t(nmat) * 128);
  for (int t = 0; t < 32; ++t) {
    for (int i = 0; i < nmat; ++i) {
      uint16_t e[2];
      for (int h = 0; h < 2; ++h) {
        const int row = trans ? 2 * (t % 4) + h : t / 4;
        const int col = trans ? t / 4 : 2 * (t % 4) + h;
        const auto* rowp = reinterpret_cast<const uint16_t*>(in[8 * i + row].w[0]);
        e[h] = rowp[col];
      }
      out[t].w[i] = pack2(e[0], e[1]);
    }
  }
}

namespace {
inline float lo_f(uint32_t r, bool bf) { return bf ? bf16_bits_to_f32(r & 0xffff) : f16_bits_to_f32(r & 0xffff); }
inline float hi_f(uint32_t r, bool bf) { return bf ? bf16_bits_to_f32(r >> 16) : f16_bits_to_f32(r >> 16); }

// D(16x8) = A(16xK) * B(Kx8) + C, K = 16 or 8, from per-lane fragments.
void mma_fn(const emu::LaneIO* in, emu::LaneIO* out, uint32_t lanes, int K, bool bf) {
  if (lanes != 32) emu::fail_in_collective("mma.sync needs a full warp of 32 lanes");
  if (emu::counting()) emu::count_mma(16, 8, K);
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const auto* w = reinterpret_cast<const uint32_t*>(in[lane].w);
    const int g = lane >> 2, t = lane & 3;
    // A: reg0 (g, 2t..2t+1), reg1 (g+8, 2t..), reg2 (g, 2t+8..), reg3 (g+8, 2t+8..)
    for (int r = 0; r < K / 4; ++r) {
      const int row = g + ((r & 1) ? 8 : 0), col = 2 * t + ((r & 2) ? 8 : 0);
      A[row][col] = lo_f(w[r], bf);
      A[row][col + 1] = hi_f(w[r], bf);
    }
    // B: reg0 rows 2t..2t+1, reg1 rows 2t+8..2t+9, column g
    for (int r = 0; r < K / 8; ++r) {
      const int row = 2 * t + 8 * r;
      B[row][g] = lo_f(w[4 + r], bf);
      B[row + 1][g] = hi_f(w[4 + r], bf);
    }
    float c[4];
    std::memcpy(c, w + 6, 16);
    C[g][2 * t] = c[0];
    C[g][2 * t + 1] = c[1];
    C[g + 8][2 * t] = c[2];
    C[g + 8][2 * t + 1] = c[3];
  }
  float D[16][8];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      float acc = C[i][j];
      for (int k = 0; k < K; ++k) acc += A[i][k] * B[k][j];  // products of 16-bit inputs are exact in fp32
      D[i][j] = acc;
    }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    float d[4] = {D[g][2 * t], D[g][2 * t + 1], D[g + 8][2 * t], D[g + 8][2 * t + 1]};
    std::memcpy(out[lane].w, d, 16);
  }
}
}  // namespace

void mma16816_f16_fn(const emu::LaneIO* in, emu::LaneIO* out, uint32_t, uint32_t lanes) {
  mma_fn(in, out, lanes, 16, false);
}
void mma16816_bf16_fn(const emu::LaneIO* in, emu::LaneIO* out, uint32_t, uint32_t lanes) {
  mma_fn(in, out, lanes, 16, true);
}
void mma1688_f16_fn(const emu::LaneIO* in, emu::LaneIO* out, uint32_t, uint32_t lanes) {
  mma_fn(in, out, lanes, 8, false);
}

}  // namespace lt::simt::detail
