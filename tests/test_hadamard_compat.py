"""longtune.compat.fast_hadamard_transform: the fast-hadamard-transform package's contract.

The factor matrices are checked against an independent statement of the package's matrices
(digest of the +/- rows, first and last rows, entries quoted from its generated kernel source),
and every transform against a dense float64 product written here from scratch.
"""

import hashlib
import inspect
import math

import pytest
import torch

import longtune
from longtune.compat import fast_hadamard_transform as fht
from longtune.testing import assert_within_2x

from .conftest import DTYPES

FORMS = {
    1: fht.hadamard_transform,
    12: fht.hadamard_transform_12N,
    20: fht.hadamard_transform_20N,
    28: fht.hadamard_transform_28N,
    40: fht.hadamard_transform_40N,
}

# ------------------------------------------------------------------ the package's matrices, stated
# sha256 of the m rows written as '+'/'-' strings joined by '\n' (no trailing newline), taken from
# the package's generated kernel header (csrc/fast_hadamard_transform_special.h, v1.1.0).
DIGESTS = {
    12: "a8b73b2d138b0c9079b9fc7cef05cddac9efd34de7cf328925076e04f7ad089f",
    20: "40a113036aca9c3e1d767ddccee197a6d526de6728b2ef9a7d5349df8e4afdd1",
    28: "3916d8a7682dc5170fdd214f7cc08947b261fcb822691c23f91700aec5428b70",
    40: "8cd17c4fce4c2af2e3a728959ddc33324513217b6c597cfdb6d9d80fd6fe693e",
}
FIRST_LAST_ROWS = {
    12: ("+-++++++++++", "+-+--+-++---"),
    20: ("+----+----++--++-++-", "+--+--++------+----+"),
    28: ("+------++----++-+--+-+--++--", "++--++-+-++-+-+----++------+"),
    40: ("+-------------------+-------------------", "+-++----+-+-++++--++-+--++++-+-+----++--"),
}
SECOND_ROWS = {
    12: "--+-+-+-+-+-",
    20: "-+----+---+++---+-++",
    28: "-+-----+++-----+-+--+-+--++-",
    40: "++-++----+-+-++++--+++-++----+-+-++++--+",
}
# (m, row, col, sign) read off the kernel source lines "out[row] = ... {sign} x[col] ..."
QUOTED_ENTRIES = [
    (12, 1, 0, -1),
    (12, 1, 2, +1),
    (12, 11, 4, -1),
    (12, 11, 5, +1),
    (12, 11, 8, +1),
    (12, 11, 10, -1),
    (20, 0, 5, +1),
    (20, 0, 10, +1),
    (20, 0, 19, -1),
    (20, 19, 0, +1),
    (20, 19, 1, -1),
    (20, 19, 8, -1),
    (20, 19, 14, +1),
    (28, 1, 7, +1),
    (28, 1, 9, +1),
    (28, 1, 10, -1),
    (28, 27, 2, -1),
    (28, 27, 7, +1),
    (28, 27, 6, -1),
    (40, 0, 20, +1),
    (40, 0, 21, -1),
    (40, 1, 3, +1),
    (40, 39, 1, -1),
    (40, 39, 2, +1),
    (40, 39, 8, +1),
]


def _rows(F):
    return ["".join("+" if v > 0 else "-" for v in r.tolist()) for r in F]


@pytest.mark.parametrize("m", [12, 20, 28, 40])
def test_factor_matches_package(m):
    F = fht.factor_matrix(m)
    assert F.shape == (m, m) and F.dtype == torch.int64
    rows = _rows(F)
    assert hashlib.sha256("\n".join(rows).encode()).hexdigest() == DIGESTS[m]
    assert (rows[0], rows[-1]) == FIRST_LAST_ROWS[m]
    assert rows[1] == SECOND_ROWS[m]
    for mm, i, j, s in QUOTED_ENTRIES:
        if mm == m:
            assert F[i, j].item() == s, (m, i, j)
    assert torch.equal(F @ F.T, m * torch.eye(m, dtype=torch.int64))
    # only F_12 is symmetric: the transpose in the composition matters for the others
    assert torch.equal(F, F.T) == (m == 12)


# ------------------------------------------------------------------ dense float64 references
def _sylvester(P):
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < P:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _fwht(x):
    """x @ H_P over the last dimension by butterflies: [a, b] @ H_2P = [aH + bH, aH - bH]."""
    P = x.shape[-1]
    h = 1
    while h < P:
        y = x.reshape(*x.shape[:-1], P // (2 * h), 2, h)
        x = torch.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], dim=-2).reshape(
            x.shape
        )
        h *= 2
    return x


def _dense_matrix(m, P):
    """The package's map as a matrix on row vectors: x @ kron(F_m^T, H_P)."""
    if m == 1:
        return _sylvester(P)
    F = fht.factor_matrix(m, dtype=torch.float64)
    return torch.kron(F.T.contiguous(), _sylvester(P))


def _kernel_order(x, m, P, scale):
    """The package's kernel written out: row index c * P + p, Sylvester over p, then
    out[c] = sum_j F_m[c, j] * in[j] over the chunk index c (float64)."""
    z = _fwht(x.double().reshape(*x.shape[:-1], m, P))
    if m == 1:
        return z.reshape(x.shape) * scale
    F = fht.factor_matrix(m, dtype=torch.float64)
    out = torch.stack([sum(F[c, j] * z[..., j, :] for j in range(m)) for c in range(m)], dim=-2)
    return out.reshape(x.shape) * scale


@pytest.mark.parametrize("m", [12, 20, 28, 40])
@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_nform_equals_dense_kron(m, k):
    P = 2**k
    n = m * P
    x = torch.randn(3, n, dtype=torch.float64)
    y = FORMS[m](x, 0.37)
    torch.testing.assert_close(y, x @ _dense_matrix(m, P) * 0.37, rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(y, _kernel_order(x, m, P, 0.37), rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(
        fht.hadamard_matrix(n, m, dtype=torch.float64), _dense_matrix(m, P), rtol=0, atol=0
    )


@pytest.mark.parametrize("m", [12, 20, 28, 40])
def test_nform_largest_size(m):
    n = m * 1024
    x = torch.randn(2, n, dtype=torch.float64)
    torch.testing.assert_close(FORMS[m](x), _kernel_order(x, m, 1024, 1.0), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 1024, 32768])
def test_pow2_is_sylvester(n):
    x = torch.randn(2, n, dtype=torch.float64)
    ref = x @ _sylvester(n) if n <= 4096 else _kernel_order(x, 1, n, 1.0)
    torch.testing.assert_close(fht.hadamard_transform(x), ref, rtol=1e-12, atol=1e-9)
    if n <= 1024:
        scipy_linalg = pytest.importorskip("scipy.linalg")
        H = torch.from_numpy(scipy_linalg.hadamard(n).astype("float64"))
        torch.testing.assert_close(fht.hadamard_matrix(n, dtype=torch.float64), H, rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 12, 20, 28, 40])
def test_orthogonal_at_exact_sizes(m):
    n = m * 16
    x = torch.randn(4, n, dtype=torch.float64)
    y = FORMS[m](x, 1 / math.sqrt(n))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_defaults_and_signatures():
    for m, f in FORMS.items():
        params = inspect.signature(f).parameters
        assert list(params)[:2] == ["x", "scale"] and params["scale"].default == 1.0
        assert (
            params["pad"].default is False and params["pad"].kind is inspect.Parameter.KEYWORD_ONLY
        )
        n = 16 if m == 1 else m * 4
        x = torch.randn(2, n, dtype=torch.float64)
        torch.testing.assert_close(f(x), f(x, 1.0), rtol=0, atol=0)
        torch.testing.assert_close(f(x, scale=0.5), f(x) * 0.5)
    # longtune's own transform defaults to 1/sqrt(n) and agrees with the package for 2^k
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(fht.hadamard_transform(x), longtune.hadamard_transform(x, 1.0))
    torch.testing.assert_close(fht.hadamard_transform(x) / 8, longtune.hadamard_transform(x))
    # a 0-dim tensor scale (as some callers pass 1 / torch.tensor(n).sqrt()) is accepted
    torch.testing.assert_close(
        fht.hadamard_transform(x, 1 / torch.tensor(64.0).sqrt()), x @ _sylvester(64) / 8
    )


def test_differs_from_longtune_factor_layout():
    # same size, different matrix: the reason the compat module exists
    x = torch.randn(2, 96, dtype=torch.float64)
    assert not torch.allclose(fht.hadamard_transform_12N(x), longtune.hadamard_transform(x, 1.0))


# ------------------------------------------------------------------ zero-padding (explicit only)
@pytest.mark.parametrize(
    "m,n,padded",
    [
        (1, 3, 4),
        (1, 12, 16),
        (1, 137, 256),
        (1, 1000, 1024),
        (1, 32767, 32768),
        (12, 12, 48),
        (12, 24, 48),
        (12, 100, 192),
        (12, 288, 384),
        (12, 12287, 12288),
        (20, 1, 80),
        (20, 100, 160),
        (28, 300, 448),
        (40, 161, 320),
        (40, 40959, 40960),
    ],
)
def test_pad_matches_padded_dense(m, n, padded):
    x = torch.randn(3, n, dtype=torch.float64)
    f = FORMS[m]
    with pytest.raises(ValueError, match=rf"not an exact size.*pad=True.*{padded}.*not orthogonal"):
        f(x)
    y = f(x, 0.5, pad=True)
    assert y.shape == x.shape
    xp = torch.nn.functional.pad(x, (0, padded - n))
    P = padded // m
    ref = (xp @ _dense_matrix(m, P) if padded <= 4096 else _kernel_order(xp, m, P, 1.0)) * 0.5
    torch.testing.assert_close(y, ref[..., :n], rtol=1e-12, atol=1e-9)


def test_pad_is_not_orthogonal():
    x = torch.randn(64, 12, dtype=torch.float64)
    y = fht.hadamard_transform_12N(x, 1 / math.sqrt(48), pad=True)
    assert not torch.allclose(y.norm(dim=-1), x.norm(dim=-1))


def test_pad_is_identity_at_exact_sizes():
    for m, f in FORMS.items():
        n = 32 if m == 1 else m * 8
        x = torch.randn(2, n, dtype=torch.float64)
        torch.testing.assert_close(f(x, pad=True), f(x), rtol=0, atol=0)


# ---------------------------------------------------------------- dtypes, shapes, autograd, compile
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 12, 20, 28, 40])
def test_dtypes_within_2x_of_torch(m, dtype):
    n = 256 if m == 1 else m * 32
    x = torch.randn(4, n, dtype=dtype)
    out = FORMS[m](x, 1 / math.sqrt(n))
    assert out.dtype == dtype and out.shape == x.shape
    M = _dense_matrix(m, n // m)
    ref = x.double() @ M / math.sqrt(n)
    same = x @ M.to(dtype) / math.sqrt(n)
    assert_within_2x(out, ref, same, f"m={m} n={n} {dtype}")


@pytest.mark.parametrize("m", [1, 12, 40])
def test_leading_shapes(m):
    n = 64 if m == 1 else m * 4
    M = _dense_matrix(m, n // m)
    for shape in [(n,), (2, n), (2, 3, n), (2, 1, 3, n)]:
        x = torch.randn(shape, dtype=torch.float64)
        y = FORMS[m](x, 0.25)
        assert y.shape == x.shape
        torch.testing.assert_close(y, x @ M * 0.25)
    nc = torch.randn(3, n, 5, dtype=torch.float64).transpose(1, 2)
    torch.testing.assert_close(FORMS[m](nc), nc @ M)
    for shape in [(0, n), (2, 0, n)]:
        y = FORMS[m](torch.randn(shape))
        assert y.shape == shape and y.numel() == 0


@pytest.mark.parametrize(
    "m,n,pad",
    [
        (1, 16, False),
        (12, 48, False),
        (20, 160, False),
        (28, 112, False),
        (40, 160, False),
        (1, 11, True),
        (20, 50, True),
    ],
)
def test_gradients_are_exact(m, n, pad):
    f = FORMS[m]
    x = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: f(t, 0.3, pad=pad), (x,))
    # the explicit gradient g @ M^T (M^T = kron(F_m, H_P): F_m itself, not the forward's F_m^T)
    if not pad:
        g = torch.randn(2, n, dtype=torch.float64)
        (gx,) = torch.autograd.grad(f(x, 0.3), x, g)
        torch.testing.assert_close(gx, g @ _dense_matrix(m, n // m).T * 0.3)


def test_half_gradient_dtype():
    x = torch.randn(3, 96, dtype=torch.bfloat16, requires_grad=True)
    fht.hadamard_transform_12N(x).sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a, b):
        return fht.hadamard_transform_20N(a, 0.5) * 2, fht.hadamard_transform(b, pad=True)

    a = torch.randn(4, 80, requires_grad=True)
    b = torch.randn(2, 100)
    ya, yb = f(a, b)
    torch.testing.assert_close(
        ya.double(), a.detach().double() @ _dense_matrix(20, 4), rtol=1e-5, atol=1e-4
    )
    ref_b = (torch.nn.functional.pad(b.double(), (0, 28)) @ _sylvester(128))[:, :100]
    torch.testing.assert_close(yb.double(), ref_b, rtol=1e-5, atol=1e-4)
    ya.sum().backward()
    torch.testing.assert_close(
        a.grad.double(),
        torch.ones(4, 80, dtype=torch.float64) @ _dense_matrix(20, 4).T,
        rtol=1e-5,
        atol=1e-4,
    )


def test_torch_compile_inductor():
    torch._dynamo.reset()
    f = torch.compile(lambda t: fht.hadamard_transform_28N(t) + 1, fullgraph=True)
    x = torch.randn(3, 112)
    torch.testing.assert_close(
        f(x).double(), x.double() @ _dense_matrix(28, 4) + 1, rtol=1e-5, atol=1e-4
    )


# ------------------------------------------------------------------ bad input
def test_bad_input():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fht.hadamard_transform([1.0, 2.0])
    with pytest.raises(ValueError, match="at least 1 dimension"):
        fht.hadamard_transform_12N(torch.tensor(1.0))
    with pytest.raises(
        TypeError, match="x must be float32, float16, bfloat16 or float64, got torch.int64"
    ):
        fht.hadamard_transform(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="must be at least 1, got 0"):
        fht.hadamard_transform(torch.randn(2, 0), pad=True)
    with pytest.raises(ValueError, match="at most 32768"):
        fht.hadamard_transform(torch.randn(1, 32769), pad=True)
    with pytest.raises(ValueError, match="at most 12288"):
        fht.hadamard_transform_12N(torch.randn(1, 12 * 2048))
    with pytest.raises(ValueError, match=r"nearest: 96 below, 192 above"):
        fht.hadamard_transform_12N(torch.randn(1, 100))
    with pytest.raises(ValueError, match="m must be one of 12, 20, 28, 40"):
        fht.factor_matrix(36)
    with pytest.raises(ValueError, match="m must be 1, 12, 20, 28 or 40"):
        fht.hadamard_matrix(144, 36)
