// Schemas of the emulated CUDA kernels (torch.ops.longtune_emu.*): the same signatures as
// torch.ops.longtune.*, implemented on CPU tensors by running the CUDA device code on the
// emulator. Test-only; built when LONGTUNE_EMU=ON (the default).
#include <torch/library.h>

#include <c10/util/Exception.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "common/op_schemas.h"
#include "emu/runtime.h"

namespace {
// The emulator's grid cap (see emu::grid_cap): a block count >= 0 (0: no cap) or None (the
// environment variable LONGTUNE_EMU_GRID_CAP decides); returns the previous setting.
std::optional<int64_t> set_grid_cap(std::optional<int64_t> max_blocks) {
  TORCH_CHECK(!max_blocks || *max_blocks >= 0,
              "longtune_emu.set_grid_cap: max_blocks must be a block count >= 0 (0: no cap) or None, got ",
              *max_blocks);
  const int64_t prev = lt::emu::set_grid_cap(max_blocks ? *max_blocks : -1);
  return prev < 0 ? std::nullopt : std::optional<int64_t>(prev);
}

// The global-memory race check (see emu::global_race_check): True / False, or None (the
// environment variable LONGTUNE_EMU_GLOBAL_RACES decides, on unless it is 0); returns the
// previous setting.
std::optional<bool> set_global_race_check(std::optional<bool> on) {
  const int prev = lt::emu::set_global_race_check(on ? int(*on) : -1);
  return prev < 0 ? std::nullopt : std::optional<bool>(prev == 1);
}

bool set_counters(bool on) { return lt::emu::set_counters(on); }
void reset_counters() { lt::emu::reset_counters(); }

void json_string(std::ostringstream& o, const std::string& s) {
  o << '"';
  for (const char ch : s) {
    if (ch == '"' || ch == '\\') o << '\\' << ch;
    else if (static_cast<unsigned char>(ch) < 0x20) o << ' ';
    else o << ch;
  }
  o << '"';
}

// One JSON object per recorded launch (longtune.testing.emulator_counters parses them).
std::vector<std::string> counters() {
  std::vector<std::string> out;
  for (const lt::emu::LaunchCounters& r : lt::emu::counters()) {
    std::ostringstream o;
    o << "{\"kernel\": ";
    json_string(o, r.kernel);
    o << ", \"grid\": [" << r.grid.x << ", " << r.grid.y << ", " << r.grid.z << "], \"block\": [" << r.block.x << ", "
      << r.block.y << ", " << r.block.z << "]";
    auto field = [&](const char* k, uint64_t v) { o << ", \"" << k << "\": " << v; };
    field("smem_bytes", r.smem_bytes);
    field("blocks", r.blocks);
    field("threads", r.threads);
    field("barriers", r.barriers);
    field("mma_m16n8k16", r.mma_m16n8k16);
    field("mma_m16n8k8", r.mma_m16n8k8);
    field("mma_flops", r.mma_flops);
    field("ldmatrix", r.ldmatrix);
    field("ldmatrix_bytes", r.ldmatrix_bytes);
    field("cp_async", r.cp_async);
    field("cp_async_bytes", r.cp_async_bytes);
    field("global_read_bytes", r.global_read_bytes);
    field("global_write_bytes", r.global_write_bytes);
    field("shared_read_bytes", r.shared_read_bytes);
    field("shared_write_bytes", r.shared_write_bytes);
    o << ", \"global_by_tensor\": {";
    bool first = true;
    for (const lt::emu::TensorBytes& t : r.global_by_tensor) {
      o << (first ? "" : ", ");
      first = false;
      json_string(o, t.name);
      o << ": {\"read\": " << t.read << ", \"written\": " << t.written << "}";
    }
    o << "}}";
    out.push_back(o.str());
  }
  return out;
}
}  // namespace

TORCH_LIBRARY(longtune_emu, m) {
#define LT_DEF(schema) m.def(schema)
  LT_FOR_EACH_SCHEMA(LT_DEF);
#undef LT_DEF
  // Deliberately wrong kernels (csrc/cuda/selftest/probes.cuh): each must raise the emulator's report.
  m.def("faulty_kernel(Tensor x, int which) -> Tensor");
  // Launch option of the emulated launchers (no tensors: one kernel for every backend).
  m.def("set_grid_cap(int? max_blocks) -> int?", &set_grid_cap);
  m.def("set_global_race_check(bool? on) -> bool?", &set_global_race_check);
  // Per-launch counters (emu::LaunchCounters): switch (returns the previous setting), the records
  // of the launches since the last reset (one JSON object each), reset.
  m.def("set_counters(bool on) -> bool", &set_counters);
  m.def("counters() -> str[]", &counters);
  m.def("reset_counters() -> ()", &reset_counters);
}
