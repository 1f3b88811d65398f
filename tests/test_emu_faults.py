"""Deliberately wrong kernels (csrc/cuda/selftest/probes.cuh): the emulator must report each one
with a clear message naming the kernel, block and thread - never pass silently or hang."""

import pytest
import torch

FAULTS = {
    0: (
        r"shared memory race \((read-after-write|write-after-read)\)"
        r".*sync_block\(\) \(or sync_warp\(\)\) is missing"
    ),
    2: r"deadlock.*sync_block\(\) was reached by 32 of 64 threads.*exited: 32,33",
    3: (
        r"thread \(5,0,0\).*shared memory write of 4 bytes at byte offset 256"
        r" is outside the 256 bytes"
    ),
    4: (
        r"deadlock.*shfl_xor with mask 0xffffffff was reached only by lanes 0x0000ffff"
        r" \(missing 0xffff0000\)"
    ),
    5: (
        r"thread \(63,0,0\).*global memory access of 4 bytes at byte offset 256"
        r" is outside tensor 'x'"
    ),
    6: r"cp.async issued by thread \d+ that has not been waited for",
    7: r"vector load from global memory .* not aligned to 16 bytes",
    # caught whichever order the threads run in: after the writer's own read (write-after-read
    # against the neighbour, an earlier reader) or before the neighbour's read (read-after-write)
    8: r"shared memory race \((write-after-read|read-after-write)\)",
}


@pytest.mark.parametrize("which", sorted(FAULTS))
def test_faulty_kernel_is_reported(which):
    x = torch.arange(64, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=FAULTS[which]) as e:
        torch.ops.longtune_emu.faulty_kernel(x, which)
    assert "kernel faulty_kernel, block (0,0,0)" in str(e.value)


def test_correct_barrier_passes():
    # the fixed twin of the missing-barrier kernel: no false positive, right answer
    x = torch.arange(64, dtype=torch.float32)
    y = torch.ops.longtune_emu.faulty_kernel(x, 1)
    torch.testing.assert_close(y, torch.roll(x, -1))


def test_emulator_is_reusable_after_a_fault():
    x = torch.arange(64, dtype=torch.float32)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            torch.ops.longtune_emu.faulty_kernel(x, 4)
        torch.testing.assert_close(torch.ops.longtune_emu.faulty_kernel(x, 1), torch.roll(x, -1))


@pytest.mark.parametrize("threads", [32, 96, 1024])
def test_block_sizes(threads):
    x = torch.randn(threads)
    torch.testing.assert_close(torch.ops.longtune_emu.faulty_kernel(x, 1), torch.roll(x, -1))


def test_grid_cap_setting(monkeypatch):
    from longtune.testing import emulator_grid_cap

    set_cap = torch.ops.longtune_emu.set_grid_cap
    monkeypatch.delenv("LONGTUNE_EMU_GRID_CAP", raising=False)
    x = torch.randn(40, 96)
    free = torch.ops.longtune_emu.hadamard_transform(x, 0.5)
    assert set_cap(None) is None  # unset: the environment decides
    with emulator_grid_cap(1):
        assert set_cap(2) == 1
        with emulator_grid_cap(0):
            assert set_cap(0) == 0
        assert set_cap(None) == 2
        set_cap(2)
        assert torch.equal(torch.ops.longtune_emu.hadamard_transform(x, 0.5), free)
    assert set_cap(None) is None  # restored
    with pytest.raises(ValueError, match="max_blocks must be an int >= 0"):
        with emulator_grid_cap(-1):
            pass
    with pytest.raises(RuntimeError, match="set_grid_cap: max_blocks must be a block count >= 0"):
        set_cap(-3)
    # the environment variable, read at every launch while no cap is set
    monkeypatch.setenv("LONGTUNE_EMU_GRID_CAP", "1")
    assert torch.equal(torch.ops.longtune_emu.hadamard_transform(x, 0.5), free)
    monkeypatch.setenv("LONGTUNE_EMU_GRID_CAP", "one")
    with pytest.raises(RuntimeError, match="LONGTUNE_EMU_GRID_CAP must be a block count >= 0"):
        torch.ops.longtune_emu.hadamard_transform(x, 0.5)
    with emulator_grid_cap(0):  # a set cap wins over the environment
        assert torch.equal(torch.ops.longtune_emu.hadamard_transform(x, 0.5), free)
