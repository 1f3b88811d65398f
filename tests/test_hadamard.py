"""CPU kernel of longtune.hadamard_transform against the float64 reference, plus the op's
registrations (fake, autograd, opcheck, torch.compile) and its bad-input errors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longtune
from longtune.reference import hadamard as R
from longtune.testing import assert_within_2x

from .conftest import DTYPES, FACTORS, POW2


def _check(x, scale, transpose=False):
    op = (
        torch.ops.longtune.hadamard_transform_backward
        if transpose
        else torch.ops.longtune.hadamard_transform
    )
    out = op(x, scale)
    ref = R.hadamard_transform(x.double(), scale, transpose=transpose)
    same = R.hadamard_transform_same_dtype(x, scale, transpose=transpose)
    assert_within_2x(out, ref, same, f"n={x.shape[-1]} {x.dtype} transpose={transpose}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", POW2)
def test_pow2_matches_reference(n, dtype):
    rows = max(1, min(7, 2**16 // n))
    _check(torch.randn(rows, n, dtype=dtype), 1 / math.sqrt(n))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", FACTORS)
@pytest.mark.parametrize("k", [0, 1, 5])
def test_factor_sizes_match_reference(m, k, dtype):
    n = m * 2**k
    x = torch.randn(3, n, dtype=dtype)
    _check(x, 0.37)
    _check(x, 0.37, transpose=True)


@pytest.mark.parametrize("n", [4864, 18944, 28672])  # Qwen2.5-7B, Qwen2.5-7B/72B MLP, Llama-3-70B
def test_model_sizes(n):
    _check(torch.randn(2, n), 1 / math.sqrt(n))


def test_pow2_is_sylvester_order():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    for n in [1, 2, 4, 8, 64, 1024]:
        H = torch.from_numpy(scipy_linalg.hadamard(n).astype(np.float64))
        x = torch.randn(4, n, dtype=torch.float64)
        torch.testing.assert_close(longtune.hadamard_transform(x, 1.0), x @ H)
        torch.testing.assert_close(longtune.hadamard_matrix(n, dtype=torch.float64), H)


@pytest.mark.parametrize("m", FACTORS + [1, 2, 4, 8])
def test_factor_is_hadamard(m):
    n = m if R.plan(m) is not None else 4 * m
    H = longtune.hadamard_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(H @ H.T, n * torch.eye(n, dtype=torch.float64), rtol=0, atol=0)
    assert set(H.unique().tolist()) <= {-1.0, 1.0}


def test_kron_order_is_documented():
    # H_n = kron(H_m, H_{2^k}) with H_m the outer index
    m, P = 12, 8
    H = longtune.hadamard_matrix(m * P, dtype=torch.float64)
    Hm = R.hadamard_factor(m).double()
    Hp = R.sylvester(P).double()
    torch.testing.assert_close(H, torch.kron(Hm, Hp), rtol=0, atol=0)


def test_cpp_factors_equal_python_construction():
    # the C++ constructions are independent of the Python ones: compare through the op
    for m in FACTORS:
        n = R.plan(m)[0] if R.plan(m) else R.plan(4 * m)[0]
        eye = torch.eye(n, dtype=torch.float64)
        torch.testing.assert_close(
            longtune.hadamard_transform(eye, 1.0), R.hadamard_matrix(n), rtol=0, atol=0
        )


@pytest.mark.parametrize("n", [16, 12, 76 * 4, 1024, 172 * 2])
def test_orthogonal_after_scaling(n):
    x = torch.randn(5, n, dtype=torch.float64)
    y = longtune.hadamard_transform(x)  # default scale 1/sqrt(n)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(
        torch.ops.longtune.hadamard_transform_backward(y, 1 / math.sqrt(n)), x
    )


def test_leading_shapes_and_noncontiguous():
    x = torch.randn(3, 64, 5, dtype=torch.float32).transpose(1, 2)  # [3, 5, 64], last dim strided
    assert not x.is_contiguous()
    ref = R.hadamard_transform(x.double(), 0.5).float()
    torch.testing.assert_close(longtune.hadamard_transform(x, 0.5), ref, rtol=1e-5, atol=1e-5)
    big = torch.randn(4, 256)[:, :128]  # row stride 256, unit inner stride
    torch.testing.assert_close(
        longtune.hadamard_transform(big, 1.0),
        R.hadamard_transform(big.double(), 1.0).float(),
        rtol=1e-5,
        atol=1e-4,
    )
    one_d = torch.randn(32)
    torch.testing.assert_close(
        longtune.hadamard_transform(one_d, 1.0),
        R.hadamard_transform(one_d.double(), 1.0).float(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_empty_leading_dims():
    for shape in [(0, 64), (2, 0, 12), (0, 1)]:
        x = torch.randn(shape)
        y = longtune.hadamard_transform(x)
        assert y.shape == x.shape and y.numel() == 0


def test_gradcheck_float64():
    for n in [8, 12, 40]:
        x = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: longtune.hadamard_transform(t, 0.3), (x,))
        assert torch.autograd.gradgradcheck(lambda t: longtune.hadamard_transform(t, 0.3), (x,))


@pytest.mark.parametrize("n", [16, 20])
def test_opcheck(n):
    x = torch.randn(3, n, requires_grad=True)
    torch.library.opcheck(torch.ops.longtune.hadamard_transform.default, (x, 0.5))
    torch.library.opcheck(torch.ops.longtune.hadamard_transform_backward.default, (x, 0.5))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(t):
        return longtune.hadamard_transform(t * 2, 0.25).sum(-1)

    x = torch.randn(4, 64, requires_grad=True)
    y = f(x)
    y.sum().backward()
    ref = (R.hadamard_transform(x.detach().double() * 2, 0.25)).sum(-1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        x.grad.double(),
        R.hadamard_transform(torch.full((4, 64), 2.0, dtype=torch.float64), 0.25, transpose=True),
    )


def test_torch_compile_inductor():
    torch._dynamo.reset()
    f = torch.compile(lambda t: longtune.hadamard_transform(t, 1.0) + 1, fullgraph=True)
    x = torch.randn(3, 32)
    torch.testing.assert_close(
        f(x), R.hadamard_transform(x.double(), 1.0).float() + 1, rtol=1e-5, atol=1e-5
    )


def test_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(8, 1024)
    with FlopCounterMode(display=False) as fc:
        longtune.hadamard_transform(x)
    assert fc.get_total_flops() == 8 * 1024 * 10
    x = torch.randn(2, 12 * 4)
    with FlopCounterMode(display=False) as fc:
        longtune.hadamard_transform(x)
    assert fc.get_total_flops() == 2 * 48 * (2 + 12)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    form=st.sampled_from(["pow2", "factor"]),
    k=st.integers(0, 9),
    m=st.sampled_from(FACTORS),
    dtype=st.sampled_from(DTYPES),
    scale=st.floats(-4, 4, allow_nan=False, allow_infinity=False),
)
def test_random_shapes(lead, form, k, m, dtype, scale):
    n = 2**k if form == "pow2" else m * 2 ** min(k, 4)
    x = torch.randn(*lead, n, dtype=dtype)
    out = longtune.hadamard_transform(x, scale)
    assert out.shape == x.shape and out.dtype == dtype
    if x.numel():
        ref = R.hadamard_transform(x.double(), scale)
        assert_within_2x(out, ref, R.hadamard_transform_same_dtype(x, scale), f"n={n} lead={lead}")


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64, torch.bool])
def test_rejects_non_float(dtype):
    x = torch.ones(2, 16, dtype=dtype)
    with pytest.raises(RuntimeError, match=r"x must be float32, float16, bfloat16 or float64, got"):
        torch.ops.longtune.hadamard_transform(x, 1.0)


@pytest.mark.parametrize(
    "n,below,above", [(92, 88, 96), (116, 112, 120), (3, 2, 4), (23, 20, 24), (32769, 32768, None)]
)
def test_rejects_unsupported_n_with_nearest(n, below, above):
    with pytest.raises(RuntimeError) as e:
        longtune.hadamard_transform(torch.randn(2, n))
    msg = str(e.value)
    assert f"n={n} is not a supported Hadamard size" in msg and "m*2^k" in msg
    assert f"Nearest supported below: {below}." in msg
    if above is not None:
        assert f"Nearest supported above: {above}." in msg


def test_rejects_zero_length_last_dim():
    with pytest.raises(RuntimeError, match="n=0 is not a supported"):
        torch.ops.longtune.hadamard_transform(torch.randn(3, 0), 1.0)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_rejects_non_finite_scale(scale):
    with pytest.raises(RuntimeError, match="scale must be a finite number"):
        longtune.hadamard_transform(torch.randn(2, 8), scale)


def test_rejects_0dim():
    with pytest.raises(RuntimeError, match="at least 1 dimension"):
        torch.ops.longtune.hadamard_transform(torch.tensor(1.0), 1.0)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        longtune.hadamard_transform(torch.tensor(1.0))


def test_hadamard_matrix_bad_n():
    with pytest.raises(ValueError, match="n=92 is not a supported size"):
        longtune.hadamard_matrix(92)
