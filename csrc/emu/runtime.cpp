// CPU emulator runtime: thread pool, block state, barriers, warp rendezvous, memory checks.
#include "emu/runtime.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <vector>

namespace lt::emu {
namespace {

struct Abort {};  // unwinds a thread of a failed block

enum class St : uint8_t { Running, Barrier, Warp, Exited };

struct WarpState {
  bool active = false;
  uint64_t key = 0;
  const char* op = "";
  uint32_t mask = 0, arrived = 0;
  uint64_t gen = 0;
  uint64_t syncwarp_gen = 0;  // completed sync_warp() collectives: memory ordering within the warp
  LaneIO in[32], out[32];
  std::condition_variable cv;
};

struct Copy {
  uint8_t* dst;
  const uint8_t* src;
  size_t bytes;
};

struct Block {
  std::mutex mu;
  std::condition_variable cv_bar;
  const char* kernel = "";
  Dim3 bid, bdim, gdim;
  int32_t blin = 0;  // linear block index (the global race check's block id)
  int nthreads = 0, running = 0, bar_arrived = 0;
  uint64_t bar_gen = 0;
  std::unique_ptr<WarpState[]> warps;
  std::vector<St> st;
  std::vector<const char*> site;
  bool failed = false;
  std::string error;
  std::vector<uint8_t> smem;
  std::vector<int32_t> pending;  // per shared byte: thread whose cp.async has not been waited, or -1
  // Race shadow per shared byte: last writer, last reader and the latest reader other than that
  // one (so a write-after-read is caught whichever of several readers read last), each with the
  // barrier epoch (completed sync_block count) and its warp's sync_warp epoch at the access.
  struct Shadow {
    int32_t writer = -1, reader = -1, reader2 = -1;
    uint64_t w_epoch = 0, r_epoch = 0, r2_epoch = 0, w_wsync = 0, r_wsync = 0, r2_wsync = 0;
  };
  std::vector<Shadow> shadow;
  LaunchCounters* rec = nullptr;  // the launch's record while counting, else null
};

// One thread's counts in one block (merged into the launch's record when the thread exits).
struct Tally {
  uint64_t barriers = 0, mma16816 = 0, mma1688 = 0, mma_flops = 0, ldmatrix = 0, ldmatrix_bytes = 0, cp_async = 0,
           cp_async_bytes = 0, shared_read = 0, shared_write = 0;
  struct Tensor {
    const char* name;
    uint64_t read, written;
  };
  std::vector<Tensor> tensors;  // few per kernel: a linear search by name pointer
};

struct Ctx {
  Block* b = nullptr;
  Tally tally;
  uint32_t linear = 0;
  Dim3 tid;
  std::vector<Copy> open_group;
  std::deque<std::vector<Copy>> groups;
};
thread_local Ctx* t_ctx = nullptr;

Ctx& ctx() {
  if (!t_ctx) throw std::logic_error("longtune emulator: a device intrinsic was called outside an emulated kernel");
  return *t_ctx;
}

std::string fmt_dim(Dim3 d) {
  std::ostringstream s;
  s << "(" << d.x << "," << d.y << "," << d.z << ")";
  return s.str();
}

std::string where(const Block& b, const Ctx& c) {
  return std::string("kernel ") + b.kernel + ", block " + fmt_dim(b.bid) + ", thread " + fmt_dim(c.tid) + " (warp " +
         std::to_string(c.linear / 32) + ", lane " + std::to_string(c.linear % 32) + ")";
}

void notify_all_locked(Block& b) {
  b.cv_bar.notify_all();
  const int nw = (b.nthreads + 31) / 32;
  for (int w = 0; w < nw; ++w) b.warps[w].cv.notify_all();
}

void record_failure_locked(Block& b, const std::string& msg) {
  if (!b.failed) {
    b.failed = true;
    b.error = msg;
  }
  notify_all_locked(b);
}

std::string list_threads(const Block& b, St s, int limit = 12) {
  std::ostringstream o;
  int n = 0;
  for (int t = 0; t < b.nthreads; ++t)
    if (b.st[t] == s) {
      if (n < limit) o << (n ? "," : "") << t;
      ++n;
    }
  if (n > limit) o << ",... (" << n << " threads)";
  return n ? o.str() : "none";
}

// Nobody can make progress any more: describe who waits where.
void deadlock_locked(Block& b) {
  std::ostringstream o;
  o << "kernel " << b.kernel << ", block " << fmt_dim(b.bid) << ": deadlock - no thread can make progress.";
  if (b.bar_arrived > 0)
    o << " sync_block() was reached by " << b.bar_arrived << " of " << b.nthreads
      << " threads (waiting: " << list_threads(b, St::Barrier) << ").";
  const int nw = (b.nthreads + 31) / 32;
  for (int w = 0; w < nw; ++w) {
    const WarpState& W = b.warps[w];
    if (!W.active) continue;
    char buf[256];
    std::snprintf(buf, sizeof buf, " Warp %d: %s with mask 0x%08x was reached only by lanes 0x%08x (missing 0x%08x).",
                  w, W.op, W.mask, W.arrived, W.mask & ~W.arrived);
    o << buf;
  }
  o << " Threads that exited: " << list_threads(b, St::Exited) << ".";
  record_failure_locked(b, o.str());
}

template <class Pred>
void block_wait(std::unique_lock<std::mutex>& lk, Block& b, Ctx& c, std::condition_variable& cv, Pred done, St st,
                const char* site) {
  b.st[c.linear] = st;
  b.site[c.linear] = site;
  if (--b.running == 0) deadlock_locked(b);
  cv.wait(lk, [&] { return done() || b.failed; });
  if (!done()) throw Abort{};
  b.st[c.linear] = St::Running;
}

// ------------------------------------------------------------------ thread pool
class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
      ++gen_;
    }
    cv_start_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void run(int n, const std::function<void(int)>& job) {
    std::unique_lock<std::mutex> lk(mu_);
    while (static_cast<int>(threads_.size()) < n) {
      const int i = static_cast<int>(threads_.size());
      threads_.emplace_back([this, i] { worker(i); });
    }
    job_ = &job;
    active_ = n;
    done_ = 0;
    ++gen_;
    cv_start_.notify_all();
    cv_done_.wait(lk, [&] { return done_ == active_; });
    job_ = nullptr;
  }

 private:
  void worker(int i) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_start_.wait(lk, [&] { return gen_ != seen; });
      seen = gen_;
      if (stop_) return;
      if (i >= active_) continue;
      const auto* job = job_;
      lk.unlock();
      (*job)(i);
      lk.lock();
      if (++done_ == active_) cv_done_.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_start_, cv_done_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t gen_ = 0;
  int active_ = 0, done_ = 0;
  bool stop_ = false;
};

Pool& pool() {
  static Pool p;
  return p;
}
std::mutex g_launch_mu;
std::atomic<int64_t> g_grid_cap{-1};  // -1: unset (LONGTUNE_EMU_GRID_CAP decides)
std::vector<LaunchCounters> g_records;  // guarded by g_launch_mu

// ---- global race check state (one launch at a time: g_launch_mu)
std::atomic<int> g_race_setting{-1};  // -1: unset (LONGTUNE_EMU_GLOBAL_RACES decides)
// Per global byte: the block that wrote it, read it and updated it atomically (-1: none; -2:
// several blocks). Blocks run one after another here, the threads of a block concurrently, so the
// entries are updated with relaxed atomics (threads of one block store the same block id).
struct GlobalShadow {
  int32_t writer = -1, reader = -1, atomic = -1;
};
constexpr uintptr_t kPageBits = 12, kPageBytes = uintptr_t(1) << kPageBits;
std::mutex g_pages_mu;
std::unordered_map<uintptr_t, std::unique_ptr<GlobalShadow[]>> g_pages;  // by page number
std::atomic<uint64_t> g_launch_gen{0};
struct PageCache {  // per thread: a few recently used pages of this launch
  uint64_t gen = ~uint64_t(0);
  uintptr_t page[8];
  GlobalShadow* sh[8];
};
thread_local PageCache t_pages;

GlobalShadow* shadow_page(uintptr_t page) {
  PageCache& c = t_pages;
  const uint64_t gen = g_launch_gen.load(std::memory_order_relaxed);
  if (c.gen != gen) {
    c.gen = gen;
    for (auto& q : c.page) q = ~uintptr_t(0);
  }
  const size_t slot = page & 7u;
  if (c.page[slot] == page) return c.sh[slot];
  std::lock_guard<std::mutex> g(g_pages_mu);
  auto& sh = g_pages[page];
  if (!sh) sh.reset(new GlobalShadow[kPageBytes]);
  c.page[slot] = page;
  c.sh[slot] = sh.get();
  return sh.get();
}

bool race_check_from_env() {
  const char* env = std::getenv("LONGTUNE_EMU_GLOBAL_RACES");
  if (env == nullptr || *env == '\0') return true;
  const std::string v(env);
  if (v == "1") return true;
  if (v == "0") return false;
  throw std::runtime_error("longtune emulator: LONGTUNE_EMU_GLOBAL_RACES must be 0 or 1, got '" + v + "'");
}

std::string block_name(int32_t blin, Dim3 g) {
  if (blin == -2) return "several other blocks";
  const uint32_t u = static_cast<uint32_t>(blin);
  return "block " + fmt_dim({u % g.x, (u / g.x) % g.y, u / (g.x * g.y)});
}

void merge_tally_locked(LaunchCounters& r, const Tally& t) {
  r.barriers += t.barriers;
  r.mma_m16n8k16 += t.mma16816;
  r.mma_m16n8k8 += t.mma1688;
  r.mma_flops += t.mma_flops;
  r.ldmatrix += t.ldmatrix;
  r.ldmatrix_bytes += t.ldmatrix_bytes;
  r.cp_async += t.cp_async;
  r.cp_async_bytes += t.cp_async_bytes;
  r.shared_read_bytes += t.shared_read;
  r.shared_write_bytes += t.shared_write;
  for (const Tally::Tensor& x : t.tensors) {
    r.global_read_bytes += x.read;
    r.global_write_bytes += x.written;
    auto it = std::find_if(r.global_by_tensor.begin(), r.global_by_tensor.end(),
                           [&](const TensorBytes& tb) { return tb.name == x.name; });
    if (it == r.global_by_tensor.end()) it = r.global_by_tensor.insert(it, TensorBytes{x.name, 0, 0});
    it->read += x.read;
    it->written += x.written;
  }
}

void complete_copies(Ctx& c, std::vector<Copy>& group) {
  Block& b = *c.b;
  for (const Copy& cp : group) {
    std::memcpy(cp.dst, cp.src, cp.bytes);
    const size_t off = cp.dst - b.smem.data();
    for (size_t i = 0; i < cp.bytes; ++i) b.pending[off + i] = -1;
  }
  group.clear();
}

void thread_exit(Block& b, Ctx& c) {
  std::unique_lock<std::mutex> lk(b.mu);
  // outstanding cp.async groups complete on their own on hardware
  c.groups.push_back(std::move(c.open_group));
  for (auto& g : c.groups) complete_copies(c, g);
  c.groups.clear();
  if (b.rec != nullptr) merge_tally_locked(*b.rec, c.tally);
  b.st[c.linear] = St::Exited;
  if (--b.running == 0 && !b.failed) {
    bool waiting = false;
    for (int t = 0; t < b.nthreads; ++t) waiting |= (b.st[t] == St::Barrier || b.st[t] == St::Warp);
    if (waiting) deadlock_locked(b);
  }
}

}  // namespace

// ------------------------------------------------------------------ launch options
int64_t grid_cap() {
  const int64_t set = g_grid_cap.load();
  if (set >= 0) return set;
  const char* env = std::getenv("LONGTUNE_EMU_GRID_CAP");
  if (env == nullptr || *env == '\0') return 0;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  if (*end != '\0' || v < 0)
    throw std::runtime_error(std::string("longtune emulator: LONGTUNE_EMU_GRID_CAP must be a block count >= 0, got '") +
                             env + "'");
  return v;
}

int64_t set_grid_cap(int64_t max_blocks) { return g_grid_cap.exchange(max_blocks < 0 ? -1 : max_blocks); }

int64_t capped_grid(int64_t limit) {
  const int64_t cap = grid_cap();
  return cap > 0 && cap < limit ? cap : limit;
}

// ------------------------------------------------------------------ global race check
std::atomic<bool> g_tracking{false};

bool global_race_check() {
  const int set = g_race_setting.load();
  return set >= 0 ? set == 1 : race_check_from_env();
}

int set_global_race_check(int on) { return g_race_setting.exchange(on < 0 ? -1 : (on ? 1 : 0)); }

void track_global(const void* p, size_t bytes, Access kind, const void* lo, const char* name) {
  Ctx& c = ctx();
  Block& b = *c.b;
  const int32_t me = b.blin;
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(p);
  for (size_t i = 0; i < bytes; ++i) {
    const uintptr_t a = a0 + i;
    GlobalShadow& sh = shadow_page(a >> kPageBits)[a & (kPageBytes - 1)];
    std::atomic_ref<int32_t> w(sh.writer), r(sh.reader), at(sh.atomic);
    const int32_t wv = w.load(std::memory_order_relaxed), rv = r.load(std::memory_order_relaxed),
                  av = at.load(std::memory_order_relaxed);
    auto other = [&](int32_t v) { return v != -1 && v != me; };
    const char* hazard = nullptr;
    int32_t them = -1;
    const char* what = "";
    if (other(wv)) {
      hazard = kind == Access::Read ? "read-after-write" : "write-after-write";
      them = wv;
      what = "wrote";
    } else if (kind != Access::Read && other(rv)) {
      hazard = "write-after-read";
      them = rv;
      what = "read";
    } else if (kind != Access::Atomic && other(av)) {
      hazard = kind == Access::Read ? "read of an atomic accumulation" : "write over an atomic accumulation";
      them = av;
      what = "updated atomically";
    }
    if (hazard != nullptr) {
      std::ostringstream o;
      o << "global memory race (" << hazard << ") on tensor '" << name << "' at byte offset "
        << (a - reinterpret_cast<uintptr_t>(lo)) << ": this block "
        << (kind == Access::Read    ? "reads"
            : kind == Access::Write ? "writes"
                                    : "atomically updates")
        << " a byte that " << block_name(them, b.gdim) << " " << what
        << " in the same launch; blocks run in no fixed order (use atomics, one owning block, or separate launches)";
      fail(o.str());
    }
    switch (kind) {
      case Access::Read:
        if (rv != me && rv != -2) r.store(rv == -1 ? me : -2, std::memory_order_relaxed);
        break;
      case Access::Write:
        if (wv != me) w.store(me, std::memory_order_relaxed);
        break;
      case Access::Atomic:
        if (av != me && av != -2) at.store(av == -1 ? me : -2, std::memory_order_relaxed);
        break;
    }
  }
}

// ------------------------------------------------------------------ counters
std::atomic<bool> g_counting{false};

bool set_counters(bool on) {
  std::lock_guard<std::mutex> g(g_launch_mu);  // never in the middle of a launch
  return g_counting.exchange(on);
}

std::vector<LaunchCounters> counters() {
  std::lock_guard<std::mutex> g(g_launch_mu);
  return g_records;
}

void reset_counters() {
  std::lock_guard<std::mutex> g(g_launch_mu);
  g_records.clear();
}

void count_global(const char* tensor, size_t bytes, bool write) {
  Tally& t = ctx().tally;
  auto it = std::find_if(t.tensors.begin(), t.tensors.end(), [&](const Tally::Tensor& x) { return x.name == tensor; });
  if (it == t.tensors.end()) it = t.tensors.insert(it, Tally::Tensor{tensor, 0, 0});
  (write ? it->written : it->read) += bytes;
}

void count_mma(int m, int n, int k) {
  Tally& t = ctx().tally;
  ++(k == 16 ? t.mma16816 : t.mma1688);
  t.mma_flops += 2ull * uint64_t(m) * uint64_t(n) * uint64_t(k);
}

void count_ldmatrix(size_t bytes) {
  Tally& t = ctx().tally;
  ++t.ldmatrix;
  t.ldmatrix_bytes += bytes;
}

// ------------------------------------------------------------------ launch
void launch(const char* kernel, Dim3 grid, Dim3 block, size_t smem_bytes, const Body& body) {
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  auto bad = [&](const std::string& m) {
    throw std::invalid_argument(std::string("longtune emulator: launch of ") + kernel + ": " + m);
  };
  if (nthreads == 0 || nthreads > 1024 || block.z > 64)
    bad("block " + fmt_dim(block) + " is not a valid CUDA block (1..1024 threads, z <= 64)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    bad("grid " + fmt_dim(grid) + " is not a valid CUDA grid");
  if (smem_bytes > 227 * 1024) bad("dynamic shared memory of " + std::to_string(smem_bytes) + " bytes exceeds 227 KiB");

  std::lock_guard<std::mutex> launch_guard(g_launch_mu);
  // global race check: fresh shadows for this launch, dropped when it ends (or fails)
  const bool track = global_race_check() && uint64_t(grid.x) * grid.y * grid.z <= 0x7fffffffu;
  g_launch_gen.fetch_add(1);
  struct TrackScope {
    explicit TrackScope(bool on) { g_tracking.store(on); }
    ~TrackScope() {
      g_tracking.store(false);
      std::lock_guard<std::mutex> g(g_pages_mu);
      g_pages.clear();
    }
  } track_scope(track);
  Block b;
  b.kernel = kernel;
  b.bdim = block;
  b.gdim = grid;
  b.nthreads = static_cast<int>(nthreads);
  b.warps.reset(new WarpState[(nthreads + 31) / 32]);
  b.st.resize(nthreads);
  b.site.resize(nthreads);
  b.smem.resize(smem_bytes);
  b.pending.resize(smem_bytes);
  b.shadow.resize(smem_bytes);
  LaunchCounters rec;
  if (counting()) {
    rec.kernel = kernel;
    rec.grid = grid;
    rec.block = block;
    rec.smem_bytes = smem_bytes;
    b.rec = &rec;
  }

  const std::function<void(int)> job = [&](int t) {
    Ctx c;
    c.b = &b;
    c.linear = static_cast<uint32_t>(t);
    c.tid = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    t_ctx = &c;
    try {
      body();
    } catch (const Abort&) {
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> g(b.mu);
      record_failure_locked(b, where(b, c) + ": " + e.what());
    }
    thread_exit(b, c);
    t_ctx = nullptr;
  };
  for (uint32_t z = 0; z < grid.z; ++z)
    for (uint32_t y = 0; y < grid.y; ++y)
      for (uint32_t x = 0; x < grid.x; ++x) {
        b.bid = {x, y, z};
        b.blin = static_cast<int32_t>(x + uint64_t(grid.x) * (y + uint64_t(grid.y) * z));
        b.running = b.nthreads;
        b.bar_arrived = 0;
        for (auto& s : b.st) s = St::Running;
        for (uint64_t w = 0; w < (nthreads + 31) / 32; ++w) b.warps[w].active = false;
        // uninitialised shared memory reads as NaN (0xff bytes) rather than as convenient zeros
        std::fill(b.smem.begin(), b.smem.end(), uint8_t(0xff));
        std::fill(b.pending.begin(), b.pending.end(), -1);
        std::fill(b.shadow.begin(), b.shadow.end(), Block::Shadow{});
        pool().run(b.nthreads, job);
        if (b.failed) throw std::runtime_error("longtune emulator: " + b.error);
        if (b.rec != nullptr) {
          ++rec.blocks;
          rec.threads += nthreads;
        }
      }
  if (b.rec != nullptr) g_records.push_back(std::move(rec));
}

// ------------------------------------------------------------------ in-kernel queries
Dim3 thread_idx() { return ctx().tid; }
Dim3 block_idx() { return ctx().b->bid; }
Dim3 block_dim() { return ctx().b->bdim; }
Dim3 grid_dim() { return ctx().b->gdim; }
uint32_t thread_linear() { return ctx().linear; }

void fail(const std::string& what) {
  Ctx& c = ctx();
  Block& b = *c.b;
  {
    std::lock_guard<std::mutex> g(b.mu);
    record_failure_locked(b, where(b, c) + ": " + what);
  }
  throw Abort{};
}

void fail_in_collective(const std::string& what) {
  Ctx& c = ctx();
  record_failure_locked(*c.b, where(*c.b, c) + ": " + what);
  throw Abort{};
}

void sync_block() {
  Ctx& c = ctx();
  Block& b = *c.b;
  std::unique_lock<std::mutex> lk(b.mu);
  if (b.failed) throw Abort{};
  if (++b.bar_arrived == b.nthreads) {
    b.bar_arrived = 0;
    ++b.bar_gen;
    if (b.rec != nullptr) ++c.tally.barriers;
    b.running += b.nthreads - 1;
    b.cv_bar.notify_all();
    return;
  }
  const uint64_t g = b.bar_gen;
  block_wait(lk, b, c, b.cv_bar, [&] { return b.bar_gen != g; }, St::Barrier, "sync_block");
}

void warp_collective(const char* op, uint64_t key, uint32_t mask, const LaneIO& in, LaneIO& out, WarpFn fn) {
  Ctx& c = ctx();
  Block& b = *c.b;
  std::unique_lock<std::mutex> lk(b.mu);
  if (b.failed) throw Abort{};
  const uint32_t lane = c.linear & 31u, w = c.linear >> 5;
  const uint32_t lanes = std::min<uint32_t>(32u, static_cast<uint32_t>(b.nthreads) - w * 32u);
  char buf[320];
  if (!((mask >> lane) & 1u)) {
    std::snprintf(buf, sizeof buf, "%s called with mask 0x%08x that does not include the calling lane %u", op, mask,
                  lane);
    fail_in_collective(buf);
  }
  if (lanes < 32 && (mask >> lanes) != 0) {
    std::snprintf(buf, sizeof buf, "%s mask 0x%08x names lanes that do not exist (warp %u has %u lanes)", op, mask, w,
                  lanes);
    fail_in_collective(buf);
  }
  WarpState& W = b.warps[w];
  if (W.active) {
    if (W.key != key || W.mask != mask) {
      std::snprintf(buf, sizeof buf,
                    "warp collective mismatch: this lane calls %s with mask 0x%08x while lanes 0x%08x wait in %s "
                    "with mask 0x%08x",
                    op, mask, W.arrived, W.op, W.mask);
      fail_in_collective(buf);
    }
  } else {
    W.active = true;
    W.key = key;
    W.op = op;
    W.mask = mask;
    W.arrived = 0;
  }
  W.in[lane] = in;
  W.arrived |= 1u << lane;
  if (W.arrived == mask) {
    fn(W.in, W.out, mask, lanes);
    if (key == 1) ++W.syncwarp_gen;  // simt::detail::kSyncWarp
    W.active = false;
    ++W.gen;
    b.running += std::popcount(mask) - 1;
    W.cv.notify_all();
    out = W.out[lane];
    return;
  }
  const uint64_t g = W.gen;
  block_wait(lk, b, c, W.cv, [&] { return W.gen != g; }, St::Warp, op);
  out = W.out[lane];
}

// ------------------------------------------------------------------ memory checks
uint8_t* smem_base() { return ctx().b->smem.data(); }
size_t smem_size() { return ctx().b->smem.size(); }

void check_smem(const void* p, size_t bytes, bool write) {
  Ctx& c = ctx();
  Block& b = *c.b;
  const uint8_t* q = static_cast<const uint8_t*>(p);
  const uint8_t* lo = b.smem.data();
  if (q < lo || q + bytes > lo + b.smem.size()) {
    std::ostringstream o;
    o << "shared memory " << (write ? "write" : "read") << " of " << bytes << " bytes at byte offset " << (q - lo)
      << " is outside the " << b.smem.size() << " bytes of dynamic shared memory requested";
    fail(o.str());
  }
  const size_t off = q - lo;
  for (size_t i = 0; i < bytes; ++i) {
    const int32_t owner = b.pending[off + i];
    if (owner >= 0) {
      std::ostringstream o;
      o << "shared memory " << (write ? "write" : "read") << " at byte offset " << off + i
        << " touches data of a cp.async issued by thread " << owner
        << " that has not been waited for (cp_async_wait) yet";
      fail(o.str());
    }
  }
  if (b.rec != nullptr) (write ? c.tally.shared_write : c.tally.shared_read) += bytes;
  // Hazard between two threads inside one barrier epoch = a missing sync_block (or sync_warp for
  // two lanes of one warp). Timing-independent: epochs are defined by the barriers themselves.
  const int32_t me = static_cast<int32_t>(c.linear);
  const uint64_t epoch = b.bar_gen, wsync = b.warps[c.linear / 32].syncwarp_gen;
  auto ordered = [&](int32_t other, uint64_t other_epoch, uint64_t other_wsync) {
    if (other < 0 || other == me || other_epoch != epoch) return true;
    return (other / 32 == me / 32) && other_wsync != wsync;
  };
  for (size_t i = 0; i < bytes; ++i) {
    Block::Shadow& sh = b.shadow[off + i];
    const char* hazard = nullptr;
    int32_t other = -1;
    if (!ordered(sh.writer, sh.w_epoch, sh.w_wsync)) {
      hazard = write ? "write-after-write" : "read-after-write";
      other = sh.writer;
    } else if (write && !ordered(sh.reader, sh.r_epoch, sh.r_wsync)) {
      hazard = "write-after-read";
      other = sh.reader;
    } else if (write && !ordered(sh.reader2, sh.r2_epoch, sh.r2_wsync)) {
      hazard = "write-after-read";
      other = sh.reader2;
    }
    if (hazard) {
      std::ostringstream o;
      o << "shared memory race (" << hazard << ") at byte offset " << off + i << " with thread " << other
        << " in the same barrier interval: a sync_block() (or sync_warp()) is missing between the two accesses";
      fail(o.str());
    }
    if (write) {
      sh.writer = me;
      sh.w_epoch = epoch;
      sh.w_wsync = wsync;
    } else {
      if (sh.reader != me) {
        sh.reader2 = sh.reader;
        sh.r2_epoch = sh.r_epoch;
        sh.r2_wsync = sh.r_wsync;
      }
      sh.reader = me;
      sh.r_epoch = epoch;
      sh.r_wsync = wsync;
    }
  }
}

void check_global(const void* p, size_t bytes, const void* lo, const void* hi, const char* name) {
  const uint8_t* q = static_cast<const uint8_t*>(p);
  const uint8_t* l = static_cast<const uint8_t*>(lo);
  const uint8_t* h = static_cast<const uint8_t*>(hi);
  if (q < l || q + bytes > h) {
    std::ostringstream o;
    o << "global memory access of " << bytes << " bytes at byte offset " << (q - l) << " is outside tensor '" << name
      << "' (" << (h - l) << " bytes)";
    fail(o.str());
  }
}

void check_align(const void* p, size_t align, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % align) {
    std::ostringstream o;
    o << what << " at address " << p << " is not aligned to " << align << " bytes (misaligned address on a GPU)";
    fail(o.str());
  }
}

// ------------------------------------------------------------------ cp.async
void cp_async(void* smem_dst, const void* gsrc, size_t bytes) {
  Ctx& c = ctx();
  check_smem(smem_dst, bytes, true);
  Block& b = *c.b;
  std::lock_guard<std::mutex> g(b.mu);
  const size_t off = static_cast<uint8_t*>(smem_dst) - b.smem.data();
  for (size_t i = 0; i < bytes; ++i) b.pending[off + i] = static_cast<int32_t>(c.linear);
  if (b.rec != nullptr) {
    ++c.tally.cp_async;
    c.tally.cp_async_bytes += bytes;
  }
  c.open_group.push_back({static_cast<uint8_t*>(smem_dst), static_cast<const uint8_t*>(gsrc), bytes});
}

void cp_async_commit() {
  Ctx& c = ctx();
  c.groups.push_back(std::move(c.open_group));
  c.open_group.clear();
}

void cp_async_wait(int n) {
  Ctx& c = ctx();
  std::lock_guard<std::mutex> g(c.b->mu);
  while (static_cast<int>(c.groups.size()) > n) {
    complete_copies(c, c.groups.front());
    c.groups.pop_front();
  }
}

}  // namespace lt::emu
