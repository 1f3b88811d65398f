"""The emulator's mma.sync / ldmatrix fragment layouts and shuffle semantics against tables written
from the PTX ISA documentation (tests/layout_cases.py)."""

import pytest

from . import layout_cases as L


@pytest.mark.parametrize("kind", [L.MMA_F16_16816, L.MMA_BF16_16816, L.MMA_F16_1688])
@pytest.mark.parametrize("seed", [0, 1])
def test_mma_fragments(kind, seed):
    L.run_mma_case(kind, "cpu", seed)


@pytest.mark.parametrize("nmat", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_fragments(nmat, trans):
    L.run_ldmatrix_case(nmat, trans, "cpu")


@pytest.mark.parametrize("kind", ["idx", "xor", "up", "down"])
@pytest.mark.parametrize("width", [32, 16, 8, 4, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffles(kind, width, seed):
    L.run_shuffle_case(kind, width, "cpu", seed)


def test_ballot():
    L.run_ballot_case("cpu")


def test_layout_tables_are_permutations():
    # sanity of the tables themselves: every fragment element maps to a distinct matrix entry
    assert len({L.a_16816(l, i) for l in range(32) for i in range(8)}) == 256
    assert len({L.b_16816(l, i) for l in range(32) for i in range(4)}) == 128
    assert len({L.c_16n8(l, i) for l in range(32) for i in range(4)}) == 128
    assert len({L.a_1688(l, i) for l in range(32) for i in range(4)}) == 128
    assert len({L.b_1688(l, i) for l in range(32) for i in range(2)}) == 64
