// Hadamard matrices for the fast Walsh-Hadamard transform (host-only C++).
//
// Supported sizes are n = m * 2^k (n <= kHadamardMaxN) where m = 1 (pure Sylvester) or m is a
// Hadamard order we can *construct*:
//   Paley I   : m = q + 1,      q a prime power, q = 3 (mod 4)
//   Paley II  : m = 2 (q + 1),  q a prime power, q = 1 (mod 4)
//   Williamson: m = 4 t, t in {39, 43} (156, 172), from published Williamson quadruples
// For n with odd part o > 1 we pick the smallest constructible m = o * 2^j (j >= 2) that divides n.
// The full matrix is H_n = kron(H_m, H_{2^k}) (H_m on the left / outer index). The Python
// reference (python/longtune/reference/hadamard.py) implements the same constructions
// independently; tests check the two agree entry by entry.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lt::hadamard {

constexpr int64_t kHadamardMaxN = 32768;

struct Plan {
  int64_t n = 0;   // transform size
  int64_t m = 1;   // Hadamard factor order (1: pure power of two)
  int log2p = 0;   // n = m << log2p
};

// nullopt if n is not a supported size.
std::optional<Plan> plan_for(int64_t n);
// Human-readable explanation: supported forms + nearest supported sizes below / above n.
std::string unsupported_message(int64_t n);
// Row-major m x m matrix of +-1 (cached, thread-safe). m must come from plan_for().
const std::vector<int8_t>& factor(int64_t m);
// Name of the construction used for m ("sylvester", "paley1(q=11)", ...).
std::string construction_name(int64_t m);

}  // namespace lt::hadamard
