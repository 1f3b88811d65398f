import os

import pytest
import torch

import longtune  # noqa: F401  (loads the ops)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Every supported size form: powers of two up to 2^15, and m * 2^k for each factor m.
POW2 = [2**k for k in range(16)]
FACTORS = [12, 20, 28, 36, 40, 44, 52, 60, 76, 108, 140, 148, 156, 172]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (still part of make test)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def require_cuda_build() -> bool:
    """CI sets LONGTUNE_REQUIRE_CUDA=1: then a build without CUDA kernels is a failure."""
    return os.environ.get("LONGTUNE_REQUIRE_CUDA", "0") == "1"
