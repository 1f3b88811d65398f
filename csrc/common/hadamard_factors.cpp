#include "common/hadamard_factors.h"

#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>

namespace lt::hadamard {
namespace {

// ---------------------------------------------------------------- finite fields GF(p^k)
// Elements are integers 0..q-1 read as base-p digit vectors (digit i = coefficient of x^i).
// The modulus is the smallest monic irreducible polynomial of degree k, where candidates
// x^k + sum a_i x^i are enumerated by the integer sum a_i p^i (the Python reference does the same).
struct GF {
  int64_t p = 0, k = 0, q = 0;
  std::vector<int64_t> mod;  // low coefficients a_0..a_{k-1} of the monic modulus

  std::vector<int64_t> digits(int64_t a) const {
    std::vector<int64_t> d(k);
    for (int64_t i = 0; i < k; ++i) {
      d[i] = a % p;
      a /= p;
    }
    return d;
  }
  int64_t number(const std::vector<int64_t>& d) const {
    int64_t a = 0;
    for (int64_t i = k - 1; i >= 0; --i) a = a * p + d[i];
    return a;
  }
  int64_t sub(int64_t a, int64_t b) const {
    auto da = digits(a), db = digits(b);
    for (int64_t i = 0; i < k; ++i) da[i] = ((da[i] - db[i]) % p + p) % p;
    return number(da);
  }
  int64_t mul(int64_t a, int64_t b) const {
    auto da = digits(a), db = digits(b);
    std::vector<int64_t> prod(2 * k, 0);
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) prod[i + j] = (prod[i + j] + da[i] * db[j]) % p;
    // reduce: x^k = -sum mod_i x^i
    for (int64_t t = 2 * k - 1; t >= k; --t) {
      const int64_t c = prod[t];
      if (!c) continue;
      prod[t] = 0;
      for (int64_t i = 0; i < k; ++i) prod[t - k + i] = ((prod[t - k + i] - c * mod[i]) % p + p) % p;
    }
    prod.resize(k);
    return number(prod);
  }
};

bool prime_power(int64_t q, int64_t* p_out, int64_t* k_out) {
  if (q < 2) return false;
  int64_t p = 0;
  for (int64_t d = 2; d * d <= q; ++d)
    if (q % d == 0) {
      p = d;
      break;
    }
  if (!p) p = q;
  int64_t k = 0, r = q;
  while (r % p == 0) {
    r /= p;
    ++k;
  }
  if (r != 1) return false;
  *p_out = p;
  *k_out = k;
  return true;
}

GF make_field(int64_t p, int64_t k) {
  GF f;
  f.p = p;
  f.k = k;
  f.q = 1;
  for (int64_t i = 0; i < k; ++i) f.q *= p;
  if (k == 1) {
    f.mod = {0};
    return f;
  }  // x^1 + 0: arithmetic mod p
  for (int64_t code = 0; code < f.q; ++code) {
    f.mod = f.digits(code);
    bool zero_divisor = false;
    for (int64_t a = 1; a < f.q && !zero_divisor; ++a)
      for (int64_t b = a; b < f.q; ++b)
        if (f.mul(a, b) == 0) {
          zero_divisor = true;
          break;
        }
    if (!zero_divisor) return f;
  }
  throw std::logic_error("longtune: no irreducible polynomial found");
}

// Quadratic character chi(a - b) for all a, b in GF(q).
std::vector<int8_t> jacobsthal(int64_t q) {
  int64_t p, k;
  if (!prime_power(q, &p, &k)) throw std::logic_error("longtune: jacobsthal of a non prime power");
  const GF f = make_field(p, k);
  std::vector<int8_t> is_square(q, -1);
  is_square[0] = 0;
  for (int64_t x = 1; x < q; ++x) is_square[f.mul(x, x)] = 1;
  std::vector<int8_t> Q(q * q);
  for (int64_t a = 0; a < q; ++a)
    for (int64_t b = 0; b < q; ++b) Q[a * q + b] = is_square[f.sub(a, b)];
  return Q;
}

std::vector<int8_t> paley1(int64_t q) {  // order q + 1, q = 3 mod 4: H = I + [[0, 1^T], [-1, Q]]
  const auto Q = jacobsthal(q);
  const int64_t m = q + 1;
  std::vector<int8_t> H(m * m);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      int v;
      if (i == 0) v = (j == 0) ? 0 : 1;
      else if (j == 0) v = -1;
      else v = Q[(i - 1) * q + (j - 1)];
      H[i * m + j] = static_cast<int8_t>(v + (i == j ? 1 : 0));
    }
  return H;
}

std::vector<int8_t> paley2(int64_t q) {  // order 2(q + 1), q = 1 mod 4
  const auto Q = jacobsthal(q);
  const int64_t c = q + 1, m = 2 * c;
  std::vector<int8_t> H(m * m);
  for (int64_t i = 0; i < c; ++i)
    for (int64_t j = 0; j < c; ++j) {
      int v;  // symmetric conference matrix C = [[0, 1^T], [1, Q]]
      if (i == 0) v = (j == 0) ? 0 : 1;
      else if (j == 0) v = 1;
      else v = Q[(i - 1) * q + (j - 1)];
      // 0 -> [[1,-1],[-1,-1]], +-1 -> +-[[1,1],[1,-1]]
      const int blk[2][2] = {{v == 0 ? 1 : v, v == 0 ? -1 : v}, {v == 0 ? -1 : v, v == 0 ? -1 : -v}};
      for (int r = 0; r < 2; ++r)
        for (int s = 0; s < 2; ++s) H[(2 * i + r) * m + (2 * j + s)] = static_cast<int8_t>(blk[r][s]);
    }
  return H;
}

// First rows of symmetric circulant Williamson matrices A, B, C, D (published quadruples:
// t = 43 from M. Hall, Combinatorial Theory (1983); t = 39 from the Williamson-type tables of
// Baumert-Hall / Djokovic as collected by Londono (2013)). Order 4t, checked below.
const std::map<int64_t, std::vector<const char*>>& williamson_rows() {
  static const std::map<int64_t, std::vector<const char*>> rows = {
      {39,
       {"+++--+-+-----+--++----++--+-----+-+--++", "+++--++-+---+-+--+----+--+-+---+-++--++",
        "++++---+--++----+-+--+-+----++--+---+++", "+---++-+-+-----+++-++-+++-----+-+-++---"}},
      {43,
       {"++---++++-+--+--++--------++--+--+-++++---+", "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++-++++++----+-+--++-++-++--+-+----++++++-+", "+---++--++++-+-+++-++--++-+++-+-++++--++---"}},
  };
  return rows;
}

std::vector<int8_t> williamson(int64_t t) {
  const auto& r = williamson_rows().at(t);
  auto circ = [&](int which, int64_t i, int64_t j) -> int { return r[which][((j - i) % t + t) % t] == '+' ? 1 : -1; };
  // [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]
  static const int blk_id[4][4] = {{0, 1, 2, 3}, {1, 0, 3, 2}, {2, 3, 0, 1}, {3, 2, 1, 0}};
  static const int blk_sg[4][4] = {{1, 1, 1, 1}, {-1, 1, -1, 1}, {-1, 1, 1, -1}, {-1, -1, 1, 1}};
  const int64_t m = 4 * t;
  std::vector<int8_t> H(m * m);
  for (int64_t bi = 0; bi < 4; ++bi)
    for (int64_t bj = 0; bj < 4; ++bj)
      for (int64_t i = 0; i < t; ++i)
        for (int64_t j = 0; j < t; ++j)
          H[(bi * t + i) * m + bj * t + j] = static_cast<int8_t>(blk_sg[bi][bj] * circ(blk_id[bi][bj], i, j));
  return H;
}

enum class Kind { None, Sylvester, Paley1, Paley2, Williamson };

Kind kind_of(int64_t m, int64_t* q) {
  int64_t p, k;
  if (m == 1) return Kind::Sylvester;
  if (m % 4) return Kind::None;
  if (prime_power(m - 1, &p, &k) && (m - 1) % 4 == 3) {
    *q = m - 1;
    return Kind::Paley1;
  }
  if (prime_power(m / 2 - 1, &p, &k) && (m / 2 - 1) % 4 == 1) {
    *q = m / 2 - 1;
    return Kind::Paley2;
  }
  if (williamson_rows().count(m / 4)) {
    *q = m / 4;
    return Kind::Williamson;
  }
  return Kind::None;
}

void verify(const std::vector<int8_t>& H, int64_t m) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      int64_t s = 0;
      for (int64_t t = 0; t < m; ++t) s += H[i * m + t] * H[j * m + t];
      if (s != (i == j ? m : 0))
        throw std::logic_error("longtune: Hadamard factor of order " + std::to_string(m) + " failed H H^T = m I");
    }
}

}  // namespace

std::optional<Plan> plan_for(int64_t n) {
  if (n < 1 || n > kHadamardMaxN) return std::nullopt;
  int log2p_total = 0;
  int64_t odd = n;
  while (odd % 2 == 0) {
    odd /= 2;
    ++log2p_total;
  }
  if (odd == 1) return Plan{n, 1, log2p_total};
  for (int j = 2; j <= log2p_total; ++j) {
    int64_t q;
    const int64_t m = odd << j;
    if (kind_of(m, &q) != Kind::None) return Plan{n, m, log2p_total - j};
  }
  return std::nullopt;
}

std::string unsupported_message(int64_t n) {
  std::ostringstream s;
  s << "the last dimension n=" << n
    << " is not a supported Hadamard size; supported: n = 2^k or n = m*2^k with a constructible "
       "Hadamard factor m (Paley I: m-1 a prime power = 3 mod 4; Paley II: m/2-1 a prime power = "
       "1 mod 4; Williamson: m in {156, 172}), e.g. m in {12, 20, 28, 36, 40, 44, 52, 60, 76, 108, "
       "140, 148, 156, 172}, and n <= "
    << kHadamardMaxN << ".";
  int64_t below = std::min<int64_t>(n - 1, kHadamardMaxN);
  while (below >= 1 && !plan_for(below)) --below;
  int64_t above = std::max<int64_t>(n + 1, 1);
  while (above <= kHadamardMaxN && !plan_for(above)) ++above;
  if (below >= 1) s << " Nearest supported below: " << below << ".";
  if (above <= kHadamardMaxN) s << " Nearest supported above: " << above << ".";
  return s.str();
}

const std::vector<int8_t>& factor(int64_t m) {
  static std::mutex mu;
  static std::map<int64_t, std::vector<int8_t>> cache;
  std::lock_guard<std::mutex> g(mu);
  auto it = cache.find(m);
  if (it != cache.end()) return it->second;
  int64_t q = 0;
  std::vector<int8_t> H;
  switch (kind_of(m, &q)) {
    case Kind::Sylvester: H = {1}; break;
    case Kind::Paley1: H = paley1(q); break;
    case Kind::Paley2: H = paley2(q); break;
    case Kind::Williamson: H = williamson(q); break;
    case Kind::None: throw std::invalid_argument("longtune: no Hadamard construction for m=" + std::to_string(m));
  }
  verify(H, m);
  return cache.emplace(m, std::move(H)).first->second;
}

std::string construction_name(int64_t m) {
  int64_t q = 0;
  switch (kind_of(m, &q)) {
    case Kind::Sylvester: return "sylvester";
    case Kind::Paley1: return "paley1(q=" + std::to_string(q) + ")";
    case Kind::Paley2: return "paley2(q=" + std::to_string(q) + ")";
    case Kind::Williamson: return "williamson(t=" + std::to_string(q) + ")";
    case Kind::None: break;
  }
  return "none";
}

}  // namespace lt::hadamard
