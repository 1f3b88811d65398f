"""The CUDA kernel of longtune.hadamard_transform on a real GPU (skipped without one): the same
cases as the emulated tests, plus agreement with the emulator bit for bit where both round once."""

import math

import pytest
import torch

from longtune.reference import hadamard as R
from longtune.testing import assert_within_2x, emulated

from ..conftest import DTYPES, FACTORS, POW2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _check(x, scale, transpose=False):
    op = (
        torch.ops.longtune.hadamard_transform_backward
        if transpose
        else torch.ops.longtune.hadamard_transform
    )
    out = op(x, scale)
    ref = R.hadamard_transform(x.double().cpu(), scale, transpose=transpose)
    same = R.hadamard_transform_same_dtype(x, scale, transpose=transpose).cpu()
    assert_within_2x(out.cpu(), ref, same, f"cuda n={x.shape[-1]} {x.dtype} transpose={transpose}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", POW2)
def test_pow2(n, dtype):
    _check(torch.randn(max(1, 2**17 // n), n, dtype=dtype, device="cuda"), 1 / math.sqrt(n))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", FACTORS)
@pytest.mark.parametrize("k", [0, 3, 6])
def test_factor_sizes(m, k, dtype):
    x = torch.randn(9, m * 2**k, dtype=dtype, device="cuda")
    _check(x, 0.37)
    _check(x, 0.37, transpose=True)


@pytest.mark.parametrize("n", [4864, 18944, 28672])
def test_model_sizes(n):
    _check(torch.randn(33, n, dtype=torch.bfloat16, device="cuda"), 1 / math.sqrt(n))


@pytest.mark.parametrize("n", [64, 2048, 48])
def test_misaligned_rows(n):
    big = torch.randn(5, n + 1, dtype=torch.float16, device="cuda")
    _check(big[:, 1:], 0.5)


@pytest.mark.parametrize("n", [16, 512, 4096, 12 * 8, 172 * 4])
def test_matches_emulator(n):
    x = torch.randn(6, n, dtype=torch.float32)
    gpu = torch.ops.longtune.hadamard_transform(x.cuda(), 0.5).cpu()
    emu = emulated("hadamard_transform")(x, 0.5)
    torch.testing.assert_close(gpu, emu, rtol=1e-6, atol=1e-6)


def test_many_rows_grid_stride():
    x = torch.randn(
        1 << 21, 16, device="cuda", dtype=torch.bfloat16
    )  # more blocks than the grid cap
    _check(x[:4096], 0.25)
    y = torch.ops.longtune.hadamard_transform(x, 0.25)
    torch.testing.assert_close(
        y[-4096:].float().cpu(),
        R.hadamard_transform(x[-4096:].double().cpu(), 0.25).float(),
        rtol=2e-2,
        atol=2e-2,
    )


def test_autograd_and_compile():
    x = torch.randn(4, 256, device="cuda", requires_grad=True)
    f = torch.compile(
        lambda t: torch.ops.longtune.hadamard_transform(t, 0.5).square().sum(), fullgraph=True
    )
    f(x).backward()
    y = R.hadamard_transform(x.detach().double().cpu(), 0.5)
    torch.testing.assert_close(
        x.grad.cpu().double(),
        R.hadamard_transform(2 * y, 0.5, transpose=True),
        rtol=1e-4,
        atol=1e-4,
    )


def test_bad_input_on_cuda():
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16 on this device"):
        torch.ops.longtune.hadamard_transform(
            torch.randn(2, 16, device="cuda", dtype=torch.float64), 1.0
        )
    with pytest.raises(RuntimeError, match="n=92 is not a supported"):
        torch.ops.longtune.hadamard_transform(torch.randn(2, 92, device="cuda"), 1.0)
