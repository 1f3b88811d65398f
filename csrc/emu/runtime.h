// The CPU emulator's runtime: what the host-compiled (emulated) side of csrc/common/simt calls.
// A grid runs block by block; every block runs all its threads as truly concurrent OS threads
// (a reusable pool), with real barriers and per-warp rendezvous for warp-collective operations.
// Anything a real GPU would get wrong silently (out-of-bounds shared/global access, a barrier or
// warp collective some threads never reach, a shuffle mask naming absent lanes, data read before
// its cp.async wait) is reported as an error naming the kernel, block and thread.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/simt/types.h"

namespace lt::emu {

using simt::Dim3;

// Per-lane payload of a warp collective (enough for an m16n8k16 mma's A, B and C fragments).
struct LaneIO {
  uint64_t w[8] = {0, 0, 0, 0, 0, 0, 0, 0};
};
// Computes every participating lane's output once all lanes named in `mask` have arrived.
// `lanes` is the number of lanes the warp has (a block's last warp may be partial).
using WarpFn = void (*)(const LaneIO* in, LaneIO* out, uint32_t mask, uint32_t lanes);

// ---- launch options
// Grid cap: the most blocks an emulated launcher gives a grid-stride kernel along each capped grid
// dimension, so that every block loops over several rows / tiles / elements (0: no cap, the
// launch geometry a GPU gets). Set by set_grid_cap() (torch.ops.longtune_emu.set_grid_cap);
// until then the environment variable LONGTUNE_EMU_GRID_CAP (read at every launch) gives it.
int64_t grid_cap();
// Sets the grid cap (>= 0; 0 removes it) and returns the previous setting (-1: unset, the
// environment decides). A negative value returns to the environment's setting.
int64_t set_grid_cap(int64_t max_blocks);
// `limit` lowered to the grid cap when one is set: the max_grid the emulated launchers pass to
// the launch-planning functions the CUDA launchers also use.
int64_t capped_grid(int64_t limit);

// ---- global-memory race check
// Blocks of one launch run in no fixed order on a GPU (and concurrently), so a plain (non-atomic)
// access to a global byte that another block of the same launch writes is a race: two blocks
// writing one address, or one block reading what another writes (either order), or a plain access
// to a byte other blocks update atomically. While the check is on, every launch records, per global
// byte, which block wrote, read and atomically updated it, and the first such access raises a report
// naming the tensor, the byte offset and both blocks. Atomics between blocks are not races.
// On by default; set_global_race_check() or, until it is called, LONGTUNE_EMU_GLOBAL_RACES=0|1
// (read at every launch) decides.
bool global_race_check();
// Sets the check (1 on, 0 off, -1 back to the environment's setting); returns the previous
// setting (-1: unset).
int set_global_race_check(int on);
enum class Access : uint8_t { Read, Write, Atomic };
extern std::atomic<bool> g_tracking;  // the check is on for the launch in progress
inline bool tracking() { return g_tracking.load(std::memory_order_relaxed); }
// Called from the intrinsics layer while tracking() for every global access (lo: the tensor's base).
void track_global(const void* p, size_t bytes, Access kind, const void* lo, const char* name);

// ---- counters
// Per-launch counts of what a kernel issues (off by default; counting does not change results).
// Byte counts are what the kernel's code asks for: shared-memory reads include ldmatrix, shared
// writes include cp.async destinations, global reads include cp.async sources; an atomic
// read-modify-write counts as one read and one write of its element.
struct TensorBytes {
  std::string name;  // the gptr's name (make_gptr)
  uint64_t read = 0, written = 0;
};
struct LaunchCounters {
  std::string kernel;
  Dim3 grid, block;
  uint64_t smem_bytes = 0;  // dynamic shared memory per block
  uint64_t blocks = 0, threads = 0;
  uint64_t barriers = 0;  // completed sync_block()s, summed over blocks
  uint64_t mma_m16n8k16 = 0, mma_m16n8k8 = 0;  // warp-level mma.sync instructions by shape
  uint64_t mma_flops = 0;                      // 2 m n k per mma
  uint64_t ldmatrix = 0, ldmatrix_bytes = 0;   // warp-level instructions, bytes (128 per 8x8 matrix)
  uint64_t cp_async = 0, cp_async_bytes = 0;   // per-thread 16-byte copies, bytes
  uint64_t global_read_bytes = 0, global_write_bytes = 0;
  uint64_t shared_read_bytes = 0, shared_write_bytes = 0;
  std::vector<TensorBytes> global_by_tensor;  // in order of first access
};
extern std::atomic<bool> g_counting;
inline bool counting() { return g_counting.load(std::memory_order_relaxed); }
// Turns counting on or off (between launches) and returns the previous setting.
bool set_counters(bool on);
// The records of the launches completed while counting was on, oldest first (reset_counters()
// clears them). A launch that raises a report leaves no record.
std::vector<LaunchCounters> counters();
void reset_counters();
// Called from the intrinsics layer while counting is on.
void count_global(const char* tensor, size_t bytes, bool write);
void count_mma(int m, int n, int k);
void count_ldmatrix(size_t bytes);

// ---- launch
using Body = std::function<void()>;
// Runs `body` for every thread of every block. Throws std::runtime_error with the first report.
void launch(const char* kernel, Dim3 grid, Dim3 block, size_t smem_bytes, const Body& body);

// ---- inside a kernel
Dim3 thread_idx();
Dim3 block_idx();
Dim3 block_dim();
Dim3 grid_dim();
uint32_t thread_linear();
void sync_block();
void warp_collective(const char* op, uint64_t key, uint32_t mask, const LaneIO& in, LaneIO& out, WarpFn fn);
[[noreturn]] void fail(const std::string& what);
// Same, but for WarpFn callbacks, which run with the block's lock held.
[[noreturn]] void fail_in_collective(const std::string& what);

// ---- memory checks
uint8_t* smem_base();
size_t smem_size();
void check_smem(const void* p, size_t bytes, bool write);
void check_global(const void* p, size_t bytes, const void* lo, const void* hi, const char* name);
void check_align(const void* p, size_t align, const char* what);

// ---- cp.async
void cp_async(void* smem_dst, const void* gsrc, size_t bytes);
void cp_async_commit();
void cp_async_wait(int n);

}  // namespace lt::emu
