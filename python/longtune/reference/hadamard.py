"""Pure-PyTorch reference for the Walsh-Hadamard transform: the executable specification.

``hadamard_transform(x, scale)`` returns ``(x @ H_n) * scale`` computed as a dense float64 matrix
product, where ``H_n = kron(H_m, H_{2^k})`` and ``H_{2^k}`` is the Sylvester-ordered matrix
(``scipy.linalg.hadamard``). The factor ``H_m`` comes from the constructions below, written
independently of the C++ ones in ``csrc/common/hadamard_factors.cpp``.
"""

from __future__ import annotations

import functools
import math

import torch

MAX_N = 32768

# Williamson quadruples (first rows of symmetric circulant A, B, C, D), order 4t.
_WILLIAMSON = {
    39: (
        "+++--+-+-----+--++----++--+-----+-+--++",
        "+++--++-+---+-+--+----+--+-+---+-++--++",
        "++++---+--++----+-+--+-+----++--+---+++",
        "+---++-+-+-----+++-++-+++-----+-+-++---",
    ),
    43: (
        "++---++++-+--+--++--------++--+--+-++++---+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
    ),
}


def _prime_power(q: int):
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


class _Field:
    """GF(p^k); element a <-> base-p digits (coefficient of x^i is digit i)."""

    def __init__(self, p: int, k: int):
        self.p, self.k, self.q = p, k, p**k
        if k == 1:
            self.mod = [0]
            return
        for code in range(self.q):
            self.mod = self._digits(code)
            if all(self.mul(a, b) != 0 for a in range(1, self.q) for b in range(a, self.q)):
                return
        raise AssertionError("no irreducible polynomial")

    def _digits(self, a):
        return [(a // self.p**i) % self.p for i in range(self.k)]

    def _number(self, d):
        return sum(c * self.p**i for i, c in enumerate(d))

    def sub(self, a, b):
        return self._number([(x - y) % self.p for x, y in zip(self._digits(a), self._digits(b))])

    def mul(self, a, b):
        da, db = self._digits(a), self._digits(b)
        prod = [0] * (2 * self.k)
        for i, x in enumerate(da):
            for j, y in enumerate(db):
                prod[i + j] = (prod[i + j] + x * y) % self.p
        for t in range(2 * self.k - 1, self.k - 1, -1):
            c, prod[t] = prod[t], 0
            for i in range(self.k):
                prod[t - self.k + i] = (prod[t - self.k + i] - c * self.mod[i]) % self.p
        return self._number(prod[: self.k])


def _jacobsthal(q: int) -> torch.Tensor:
    p, k = _prime_power(q)
    f = _Field(p, k)
    chi = [-1] * q
    chi[0] = 0
    for x in range(1, q):
        chi[f.mul(x, x)] = 1
    return torch.tensor([[chi[f.sub(a, b)] for b in range(q)] for a in range(q)], dtype=torch.int64)


def _paley1(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    zero_blk = torch.tensor([[1, -1], [-1, -1]])
    one_blk = torch.tensor([[1, 1], [1, -1]])
    return torch.kron(C, one_blk) + torch.kron((C == 0).long(), zero_blk)


def _williamson(t: int) -> torch.Tensor:
    def circ(s):
        row = torch.tensor([1 if c == "+" else -1 for c in s])
        idx = (torch.arange(t)[None, :] - torch.arange(t)[:, None]) % t
        return row[idx]

    A, B, C, D = (circ(s) for s in _WILLIAMSON[t])
    return torch.cat(
        [
            torch.cat([A, B, C, D], 1),
            torch.cat([-B, A, -D, C], 1),
            torch.cat([-C, D, A, -B], 1),
            torch.cat([-D, -C, B, A], 1),
        ],
        0,
    )


def construction(m: int):
    """(name, parameter) of the construction used for a factor of order m, or None."""
    if m == 1:
        return ("sylvester", 1)
    if m % 4:
        return None
    pk = _prime_power(m - 1)
    if pk and (m - 1) % 4 == 3:
        return ("paley1", m - 1)
    pk = _prime_power(m // 2 - 1)
    if pk and (m // 2 - 1) % 4 == 1:
        return ("paley2", m // 2 - 1)
    if m // 4 in _WILLIAMSON:
        return ("williamson", m // 4)
    return None


def plan(n: int):
    """(m, log2p) with n = m * 2**log2p, or None when n is not a supported size."""
    if n < 1 or n > MAX_N:
        return None
    k, odd = 0, n
    while odd % 2 == 0:
        odd //= 2
        k += 1
    if odd == 1:
        return (1, k)
    for j in range(2, k + 1):
        if construction(odd << j) is not None:
            return (odd << j, k - j)
    return None


def is_supported(n: int) -> bool:
    return plan(n) is not None


@functools.lru_cache(maxsize=None)
def hadamard_factor(m: int) -> torch.Tensor:
    """The m x m Hadamard factor (int64, entries +-1)."""
    c = construction(m)
    if c is None:
        raise ValueError(f"no Hadamard construction for m={m}")
    name, q = c
    H = {
        "sylvester": lambda _: torch.ones(1, 1, dtype=torch.int64),
        "paley1": _paley1,
        "paley2": _paley2,
        "williamson": _williamson,
    }[name](q)
    assert torch.equal(H @ H.T, m * torch.eye(m, dtype=torch.int64)), f"H_{m} is not Hadamard"
    return H


def sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.int64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def hadamard_matrix(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Unnormalised n x n Hadamard matrix H_n = kron(H_m, H_{2^k}) (entries +-1)."""
    p = plan(n)
    if p is None:
        raise ValueError(f"n={n} is not a supported Hadamard size")
    m, k = p
    return torch.kron(hadamard_factor(m), sylvester(2**k)).to(dtype=dtype, device=device)


DENSE_MAX_N = 4096  # above this a dense n x n matrix is too large (n = 32768: 8 GiB in float64)


def _apply(x: torch.Tensor, n: int, transpose: bool) -> torch.Tensor:
    """x @ H_n (or H_n^T) in x's dtype: a dense matrix product for n <= DENSE_MAX_N, else the same
    linear map through the Kronecker identity x @ kron(A, B, C) = einsum(X, A, B, C) with
    A = H_m, B = H_{P1}, C = H_{P2} (dense factors, P1 * P2 = 2^k)."""
    if n <= DENSE_MAX_N:
        H = hadamard_matrix(n, dtype=x.dtype, device=x.device)
        return x @ (H.T if transpose else H)
    m, k = plan(n)
    mats = [hadamard_factor(m), sylvester(2 ** (k // 2)), sylvester(2 ** (k - k // 2))]
    mats = [(M.T if transpose else M).to(dtype=x.dtype, device=x.device) for M in mats]
    X = x.reshape(*x.shape[:-1], *[M.shape[0] for M in mats])
    return torch.einsum("...abc,ai,bj,ck->...ijk", X, *mats).reshape(x.shape)


def hadamard_transform(
    x: torch.Tensor, scale: float = 1.0, transpose: bool = False
) -> torch.Tensor:
    """(x @ H_n) * scale in float64 (x @ H_n^T with transpose=True), cast back to x.dtype."""
    return (_apply(x.to(torch.float64), x.shape[-1], transpose) * scale).to(x.dtype)


def hadamard_transform_same_dtype(
    x: torch.Tensor, scale: float = 1.0, transpose: bool = False
) -> torch.Tensor:
    """The same matrix product in x's own dtype: the PyTorch baseline whose error sets the bar
    (kernel error vs float64 <= 2x this one's)."""
    return _apply(x, x.shape[-1], transpose) * scale
