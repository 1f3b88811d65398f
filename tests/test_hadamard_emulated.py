"""The CUDA kernel's device code of longtune.hadamard_transform, run on the CPU emulator, against
the float64 reference: every size form (warp mode, block mode with each shared-memory radix,
every factor m), every dtype, both directions, aligned and misaligned inputs."""

import math

import pytest
import torch

from longtune.reference import hadamard as R
from longtune.testing import assert_within_2x, emulated, emulator_grid_cap

from .conftest import DTYPES, FACTORS

EMU = emulated("hadamard_transform")
EMU_BWD = emulated("hadamard_transform_backward")


def _check(x, scale, transpose=False):
    out = (EMU_BWD if transpose else EMU)(x, scale)
    ref = R.hadamard_transform(x.double(), scale, transpose=transpose)
    same = R.hadamard_transform_same_dtype(x, scale, transpose=transpose)
    assert_within_2x(out, ref, same, f"emulated n={x.shape[-1]} {x.dtype} transpose={transpose}")


# warp mode: P <= 256 (E = 8, or P when P < 8); block mode: P = 512 (radix 2), 1024 (4),
# 2048 (8), 4096 (16), 8192 (16 then 2), 32768 (16 then 8)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_pow2(n, dtype):
    rows = 3 if n >= 1024 else 37  # 37: warp mode with rows not a multiple of rows per block
    _check(torch.randn(rows, n, dtype=dtype), 1 / math.sqrt(n))


@pytest.mark.parametrize("n", [8192, 32768])
def test_pow2_large(n):
    _check(torch.randn(1, n, dtype=torch.bfloat16), 1 / math.sqrt(n))


@pytest.mark.parametrize("m", FACTORS)
@pytest.mark.parametrize("k", [0, 3])
def test_factor_sizes(m, k):
    dtype = DTYPES[(m + k) % 3]
    x = torch.randn(2, m * 2**k, dtype=dtype)
    _check(x, 0.37)
    _check(x, 0.37, transpose=True)


@pytest.mark.parametrize("n", [4864])  # Qwen2.5 intermediate size 76 * 64
def test_model_size(n):
    _check(torch.randn(2, n, dtype=torch.bfloat16), 1 / math.sqrt(n))


@pytest.mark.parametrize("n", [64, 2048, 48])
def test_misaligned_and_strided_rows(n):
    # rows start at odd element offsets: the kernel must take its scalar path (no 16-byte loads)
    big = torch.randn(5, n + 1, dtype=torch.float16)
    x = big[:, 1:]
    _check(x, 0.5)
    xt = torch.randn(n, 4).t()  # non-contiguous last dim: copied by the binding
    _check(xt, 0.5)


def test_empty_and_errors():
    assert EMU(torch.randn(0, 16), 1.0).shape == (0, 16)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16 on this device"):
        EMU(torch.randn(2, 16, dtype=torch.float64), 1.0)
    with pytest.raises(RuntimeError, match="n=92 is not a supported Hadamard size"):
        EMU(torch.randn(2, 92), 1.0)


# Grid cap: at most `cap` blocks, so every block (block mode) transforms several rows through the
# same shared memory and every warp (warp mode) several row groups; bit-identical to the uncapped
# launch. Sizes: warp mode (16, 256), block mode with m = 1 (512, 2048), with a factor m > 1
# mixing across threads (96 = 12 * 8, 1280 = 20 * 64, 6144 = 12 * 512 with shared-memory passes).
@pytest.mark.parametrize("cap", [1, 2])
@pytest.mark.parametrize(
    "n,rows", [(16, 150), (256, 20), (512, 5), (2048, 2), (96, 5), (1280, 3), (6144, 2)]
)
def test_grid_cap(n, rows, cap):
    x = torch.randn(rows, n, dtype=DTYPES[(n + cap) % 3])
    scale = 1 / math.sqrt(n)
    for op in (EMU, EMU_BWD):
        free = op(x, scale)
        with emulator_grid_cap(cap):
            capped = op(x, scale)
        assert torch.equal(capped, free), f"n={n} rows={rows} cap={cap}"
    with emulator_grid_cap(cap):
        _check(x, scale)
