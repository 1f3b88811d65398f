"""The ``fast-hadamard-transform`` package's Python interface, reproduced exactly on longtune's
kernels.

Replace ``from fast_hadamard_transform import hadamard_transform`` (or the ``_12N / _20N / _28N /
_40N`` forms from ``fast_hadamard_transform.fast_hadamard_transform_interface``) by
``from longtune.compat.fast_hadamard_transform import ...`` and the numbers stay the same: weights
rotated offline with that package's transforms stay valid.

How this contract differs from ``longtune.hadamard_transform``:

- ``scale`` defaults to ``1.0`` (unnormalised), not ``1/sqrt(n)``.
- ``hadamard_transform_{m}N`` for m in 12, 20, 28, 40 uses that package's fixed m x m factor
  matrices ``F_m`` (recorded below), not longtune's constructed factors, and applies ``F_m`` to the
  outer index of the row (the row viewed as ``(m, 2^k)``), as ``out[c] = sum_j F_m[c, j] in[j]``.
  As a matrix acting on row vectors::

      hadamard_transform_{m}N(x, s) == x @ kron(F_m.T, H_{2^k}) * s

  (``H_{2^k}`` is the Sylvester matrix, ``scipy.linalg.hadamard``). ``F_12`` is symmetric;
  ``F_20``, ``F_28`` and ``F_40`` are not, so the transpose matters. ``longtune.hadamard_transform``
  instead computes ``x @ kron(H_m, H_{2^k})`` with its own ``H_m``.
- Gradients are the exact gradients of the forward map (``g @ kron(F_m, H_{2^k}) * s``). The
  package's own backward applies the forward map to the incoming gradient, which for the
  non-symmetric ``F_20 / F_28 / F_40`` is the transpose of the true gradient; forward values agree,
  gradients of those three forms do not.
- Sizes that are not exact (not a power of two for ``hadamard_transform``; not ``m * 2^k`` with
  ``4 <= 2^k <= 1024`` for the ``{m}N`` forms) raise, unless ``pad=True`` is passed. With
  ``pad=True`` the row is zero-padded to the size the package pads to, transformed and truncated
  back to n columns, as the package does implicitly. **That map is not orthogonal** (it is the
  top-left n x n block of the padded transform: norms are not preserved and it is in general not
  invertible); use it only to reproduce results computed that way.

Beyond the package: CPU tensors and float64 (on CPU) work too, and ``torch.compile(fullgraph=True)``
traces through these functions. Arithmetic: the power-of-two part runs in longtune's kernel, the
``F_m`` product in float32 (float64 for float64 inputs); 16-bit inputs are promoted to float32 once
and the result is rounded once to the input dtype, as in the package. The ``F_m`` product is a
float32 matrix product, so ``torch.set_float32_matmul_precision("high")`` (TF32) on a GPU lowers
its precision; the package adds and subtracts in full float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.hadamard import hadamard_transform as _longtune_hadamard_transform

__all__ = [
    "hadamard_transform",
    "hadamard_transform_12N",
    "hadamard_transform_20N",
    "hadamard_transform_28N",
    "hadamard_transform_40N",
    "factor_matrix",
    "hadamard_matrix",
]

# The package's factor matrices F_m, one integer per row: bit j of row i is set when
# F_m[i, j] == -1 (and clear when it is +1). Row 0 of F_12 is therefore 0x002: "+-++++++++++".
_FACTOR_ROWS = {
    12: (
        0x002,
        0xAAB,
        0x3C8,
        0x96E,
        0xF20,
        0x5BA,
        0xC8C,
        0x6E6,
        0x23C,
        0xB96,
        0x8F0,
        0xE5A,
    ),
    20: (
        0x933DE,
        0x2E3BD,
        0x5477B,
        0xA0EF7,
        0x499EF,
        0x637C1,
        0xC6BA2,
        0x8D764,
        0x1AEE8,
        0x359F0,
        0x0FA53,
        0x174A7,
        0x26D4E,
        0x45E9C,
        0x83D39,
        0xF7A6D,
        0xEF4FA,
        0xDEDD5,
        0xBDF8B,
        0x7BF36,
    ),
    28: (
        0xCD69E7E,
        0x9AD7C7D,
        0x37AB8FB,
        0x6D571F7,
        0xD8AE3EF,
        0xB3587DF,
        0x66B4F3F,
        0xB467F43,
        0x6ACBE87,
        0xD593D8E,
        0xAB27B9C,
        0x564F7B8,
        0xAC9AFF0,
        0x5B31FE1,
        0x87FB325,
        0x0FF66CA,
        0x1DECD95,
        0x39DDB2A,
        0x71BF654,
        0xE17ECA9,
        0xC2FD9D2,
        0xFCF1299,
        0xFBE2532,
        0xF7C4AE4,
        0xEF8D549,
        0xDF1EA13,
        0xBE3D4A6,
        0x7E7A94C,
    ),
    40: (
        0xFFFFEFFFFE,
        0x615E4615E4,
        0xC2BC8C2BC8,
        0x8579285792,
        0x0AF260AF26,
        0x15E4C15E4C,
        0x2BC982BC98,
        0x5793057930,
        0xAF260AF260,
        0x5E4C25E4C2,
        0xBC984BC984,
        0x7930A7930A,
        0xF2614F2614,
        0xE4C2AE4C2A,
        0xC9856C9856,
        0x930AE930AE,
        0x2615E2615E,
        0x4C2BC4C2BC,
        0x9857898578,
        0x30AF230AF2,
        0x00001FFFFE,
        0x9EA1B615E4,
        0x3D437C2BC8,
        0x7A86D85792,
        0xF50D90AF26,
        0xEA1B315E4C,
        0xD43672BC98,
        0xA86CF57930,
        0x50D9FAF260,
        0xA1B3D5E4C2,
        0x4367BBC984,
        0x86CF57930A,
        0x0D9EBF2614,
        0x1B3D5E4C2A,
        0x367A9C9856,
        0x6CF51930AE,
        0xD9EA12615E,
        0xB3D434C2BC,
        0x67A8798578,
        0xCF50D30AF2,
    ),
}


def _decode(rows: tuple[int, ...]) -> torch.Tensor:
    m = len(rows)
    bits = torch.tensor([[(r >> j) & 1 for j in range(m)] for r in rows], dtype=torch.int64)
    F_m = 1 - 2 * bits
    assert torch.equal(F_m @ F_m.T, m * torch.eye(m, dtype=torch.int64)), (
        f"F_{m} is not a Hadamard matrix"
    )
    return F_m


_FACTORS = {m: _decode(rows) for m, rows in _FACTOR_ROWS.items()}

_MAX_POW2 = 32768  # hadamard_transform: n <= 2^15
_MIN_INNER = 4  # {m}N forms: the power-of-two part is at least 4 ...
_MAX_INNER = 1024  # ... and at most 1024 (n <= m * 1024)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def factor_matrix(m: int, dtype: torch.dtype = torch.int64, device=None) -> torch.Tensor:
    """The package's m x m factor ``F_m`` (entries +-1) for m in 12, 20, 28, 40."""
    if m not in _FACTORS:
        raise ValueError(f"factor_matrix: m must be one of 12, 20, 28, 40, got {m}")
    return _FACTORS[m].to(dtype=dtype, device=device)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _padded_inner(name: str, n: int, m: int, pad: bool) -> int:
    """The power-of-two part P of the size the transform runs at (m * P >= n)."""
    lo, hi = (1, _MAX_POW2) if m == 1 else (_MIN_INNER, _MAX_INNER)
    exact = "2^k" if m == 1 else f"{m} * 2^k with 2 <= k <= 10"
    if n < 1:
        raise ValueError(f"{name}: the last dimension of x must be at least 1, got {n}")
    P = _next_pow2(max(lo, -(-n // m)))
    if P > hi:
        raise ValueError(
            f"{name}: the last dimension of x is {n}; supported sizes are {exact}, at most {m * hi}"
        )
    if m * P != n and not pad:
        below = [m * (1 << k) for k in range(hi.bit_length()) if lo * m <= m * (1 << k) < n]
        msg = (
            f"{name}: the last dimension of x is {n}, not an exact size ({exact}; nearest: "
            f"{below[-1] if below else 'none'} below, {m * P} above)."
        )
        if name != "hadamard_matrix":
            msg += (
                f" Pass pad=True to zero-pad each row to {m * P} and keep the first {n} outputs, "
                f"as fast-hadamard-transform does implicitly; that map is not orthogonal."
            )
        raise ValueError(msg)
    return P


def _check_x(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{name}: x must have at least 1 dimension (..., dim), got a 0-dim tensor")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")


def _transform(name: str, x: torch.Tensor, scale, m: int, pad: bool) -> torch.Tensor:
    _check_x(name, x)
    scale = float(scale)
    n = x.shape[-1]
    P = _padded_inner(name, n, m, pad)
    N = m * P
    if m == 1:
        xp = F.pad(x, (0, N - n)) if N != n else x
        y = _longtune_hadamard_transform(xp, scale)
    else:
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        xp = x.to(work)
        if N != n:
            xp = F.pad(xp, (0, N - n))
        lead = x.shape[:-1]
        # the row as (m, P): the power-of-two transform on the inner index, then F_m on the outer
        z = _longtune_hadamard_transform(xp.reshape(*lead, m, P), scale)
        Fm = _FACTORS[m].to(dtype=work, device=x.device)
        y = torch.einsum("cj,...jp->...cp", Fm, z).reshape(*lead, N).to(x.dtype)
    return y[..., :n] if N != n else y


def hadamard_transform(x: torch.Tensor, scale: float = 1.0, *, pad: bool = False) -> torch.Tensor:
    """``x @ scipy.linalg.hadamard(dim) * scale`` over the last dimension (Sylvester order).

    Args:
        x: (..., dim), float32 / float16 / bfloat16 (float64 on CPU); dim = 2^k, dim <= 32768.
        scale: multiplies the output; default 1.0 as in fast-hadamard-transform.
        pad: also accept any dim <= 32768: x is zero-padded to the next power of two and the first
            dim outputs are kept (fast-hadamard-transform's implicit padding; not orthogonal).
    Returns:
        (..., dim), the dtype of x. Differentiable.
    """
    return _transform("hadamard_transform", x, scale, 1, pad)


def hadamard_transform_12N(
    x: torch.Tensor, scale: float = 1.0, *, pad: bool = False
) -> torch.Tensor:
    """``x @ kron(F_12.T, H_{2^k}) * scale``, dim = 12 * 2^k with 2 <= k <= 10 (48 ... 12288).

    ``pad=True`` accepts any dim <= 12288: zero-padded to 12 * 2^k (2^k >= 4) and truncated back
    (fast-hadamard-transform's implicit padding; not orthogonal). Output dtype = input dtype.
    """
    return _transform("hadamard_transform_12N", x, scale, 12, pad)


def hadamard_transform_20N(
    x: torch.Tensor, scale: float = 1.0, *, pad: bool = False
) -> torch.Tensor:
    """``x @ kron(F_20.T, H_{2^k}) * scale``, dim = 20 * 2^k with 2 <= k <= 10 (80 ... 20480).

    ``pad=True``: as for ``hadamard_transform_12N`` (not orthogonal).
    """
    return _transform("hadamard_transform_20N", x, scale, 20, pad)


def hadamard_transform_28N(
    x: torch.Tensor, scale: float = 1.0, *, pad: bool = False
) -> torch.Tensor:
    """``x @ kron(F_28.T, H_{2^k}) * scale``, dim = 28 * 2^k with 2 <= k <= 10 (112 ... 28672).

    ``pad=True``: as for ``hadamard_transform_12N`` (not orthogonal).
    """
    return _transform("hadamard_transform_28N", x, scale, 28, pad)


def hadamard_transform_40N(
    x: torch.Tensor, scale: float = 1.0, *, pad: bool = False
) -> torch.Tensor:
    """``x @ kron(F_40.T, H_{2^k}) * scale``, dim = 40 * 2^k with 2 <= k <= 10 (160 ... 40960).

    ``pad=True``: as for ``hadamard_transform_12N`` (not orthogonal).
    """
    return _transform("hadamard_transform_40N", x, scale, 40, pad)


def hadamard_matrix(
    n: int, m: int = 1, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """The dense n x n matrix M of the exact-size transform: ``transform(x, 1.0) == x @ M``.

    m = 1: ``hadamard_transform`` (n = 2^k); m in 12, 20, 28, 40: ``hadamard_transform_{m}N``
    (n = m * 2^k, 4 <= 2^k <= 1024). ``M @ M.T == n * I``.
    """
    name = "hadamard_matrix"
    if m != 1 and m not in _FACTORS:
        raise ValueError(f"{name}: m must be 1, 12, 20, 28 or 40, got {m}")
    P = _padded_inner(name, int(n), m, pad=False)
    H = torch.ones(1, 1, dtype=torch.int64)
    while H.shape[0] < P:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    if m != 1:
        H = torch.kron(_FACTORS[m].T.contiguous(), H)
    return H.to(dtype=dtype, device=device)
