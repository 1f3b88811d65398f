"""The emulator's global-memory race check: a plain access to a global byte that another block of
the same launch writes (or updates atomically) is reported, naming the kernel, the tensor, the
byte offset and both blocks; atomics between blocks and blocks with disjoint outputs pass."""

import pytest
import torch

from longtune.testing import emulator_race_check

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops, "longtune_emu") or not hasattr(torch.ops.longtune_emu, "faulty_kernel"),
    reason="built without the emulator",
)

N = 64  # two blocks of 32 threads


def faulty(which: int) -> torch.Tensor:
    x = torch.arange(N, dtype=torch.float32) + 1
    return torch.ops.longtune_emu.faulty_kernel(x, which)


RACES = {
    # block (1,0,0) stores y[t] that block (0,0,0) stored
    9: (
        r"kernel faulty_kernel, block \(1,0,0\).*global memory race \(write-after-write\) on"
        r" tensor 'y' at byte offset \d+: this block writes a byte that block \(0,0,0\) wrote"
        r" in the same launch"
    ),
    # block 0 reads y[32..] before block 1 stores it: block 1's store is the second access
    10: (
        r"block \(1,0,0\).*global memory race \(write-after-read\) on tensor 'y' at byte"
        r" offset \d+: this block writes a byte that block \(0,0,0\) read"
    ),
    # block 1's atomic add meets block 0's plain read of the accumulation
    13: (
        r"block \(1,0,0\).*global memory race \(write-after-read\) on tensor 'y' at byte"
        r" offset \d+: this block atomically updates a byte that block \(0,0,0\) read"
    ),
}


@pytest.mark.parametrize("which", sorted(RACES))
def test_cross_block_race_is_reported(which):
    with emulator_race_check(True):
        with pytest.raises(RuntimeError, match=RACES[which]):
            faulty(which)


def test_atomics_across_blocks_pass():
    x = torch.arange(N, dtype=torch.float32) + 1
    with emulator_race_check(True):
        y = faulty(11)
    torch.testing.assert_close(y[: N // 2], x[: N // 2] + x[N // 2 :])
    assert torch.all(y[N // 2 :] == 0)


def test_disjoint_blocks_pass():
    with emulator_race_check(True):
        y = faulty(12)
    torch.testing.assert_close(y, torch.arange(N, dtype=torch.float32) + 1)


@pytest.mark.parametrize("which", sorted(RACES))
def test_check_can_be_switched_off(which):
    # the same kernels run to completion without the check (the race goes unseen, as on a GPU
    # where it would give order-dependent results)
    with emulator_race_check(False):
        faulty(which)
    with emulator_race_check(True), pytest.raises(RuntimeError, match="global memory race"):
        faulty(which)


def test_setting_and_environment(monkeypatch):
    set_check = torch.ops.longtune_emu.set_global_race_check
    assert set_check(None) is None  # unset: the environment decides
    monkeypatch.setenv("LONGTUNE_EMU_GLOBAL_RACES", "0")
    faulty(9)  # off by the environment
    monkeypatch.setenv("LONGTUNE_EMU_GLOBAL_RACES", "1")
    with pytest.raises(RuntimeError, match="global memory race"):
        faulty(9)
    monkeypatch.delenv("LONGTUNE_EMU_GLOBAL_RACES")
    with pytest.raises(RuntimeError, match="global memory race"):  # on by default
        faulty(9)
    monkeypatch.setenv("LONGTUNE_EMU_GLOBAL_RACES", "yes")
    with pytest.raises(RuntimeError, match="LONGTUNE_EMU_GLOBAL_RACES must be 0 or 1"):
        faulty(12)
    monkeypatch.delenv("LONGTUNE_EMU_GLOBAL_RACES")
    with emulator_race_check(False):
        assert set_check(None) is False
        set_check(False)
    assert set_check(None) is None  # restored
    with pytest.raises(ValueError, match="enabled must be a bool"):
        with emulator_race_check(1):
            pass


def test_emulator_is_reusable_after_a_race():
    for _ in range(3):
        with emulator_race_check(True), pytest.raises(RuntimeError, match="global memory race"):
            faulty(10)
        with emulator_race_check(True):
            torch.testing.assert_close(faulty(12), torch.arange(N, dtype=torch.float32) + 1)
