"""The real GPU's mma.sync / ldmatrix / shuffle results against the same PTX-derived tables the
emulator is tested with (skipped without a GPU): a mismatch would mean the emulator is wrong too."""

import pytest
import torch

from .. import layout_cases as L

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.parametrize("kind", [L.MMA_F16_16816, L.MMA_BF16_16816, L.MMA_F16_1688])
def test_mma_fragments(kind):
    L.run_mma_case(kind, "cuda")


@pytest.mark.parametrize("nmat", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_fragments(nmat, trans):
    L.run_ldmatrix_case(nmat, trans, "cuda")


@pytest.mark.parametrize("kind", ["idx", "xor", "up", "down"])
@pytest.mark.parametrize("width", [32, 16, 4])
def test_shuffles(kind, width):
    L.run_shuffle_case(kind, width, "cuda")


def test_ballot():
    L.run_ballot_case("cuda")
