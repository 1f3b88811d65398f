"""Test helpers: the emulated CUDA kernels and the error rule every kernel test uses."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import torch


def emulated(op: str):
    """The emulated CUDA kernel of ``torch.ops.longtune.<op>``: the same device code run on the CPU
    emulator (csrc/emu), called on CPU tensors. Raises if this build has no emulator."""
    ns = getattr(torch.ops, "longtune_emu", None)
    if ns is None or not hasattr(ns, op):
        raise RuntimeError(
            f"longtune was built without the emulator (LONGTUNE_EMU=OFF): no emulated {op}"
        )
    return getattr(ns, op)


@contextlib.contextmanager
def emulator_grid_cap(max_blocks: int) -> Iterator[None]:
    """Within the block, the emulated launchers give every grid-stride kernel at most
    ``max_blocks`` blocks per grid-stride dimension (0: no cap), so that each block loops over
    several rows, tiles or elements: the launch geometry of a large input on a GPU, on a small
    input. The previous setting (or the environment variable ``LONGTUNE_EMU_GRID_CAP``) is
    restored on exit. Raises if this build has no emulator."""
    if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 0:
        raise ValueError(f"max_blocks must be an int >= 0 (0: no cap), got {max_blocks!r}")
    set_cap = emulated("set_grid_cap")
    previous = set_cap(max_blocks)
    try:
        yield
    finally:
        set_cap(previous)


@contextlib.contextmanager
def emulator_race_check(enabled: bool) -> Iterator[None]:
    """Within the block, the emulator's global-memory race check is on (``True``) or off
    (``False``). While it is on (the default, unless the environment variable
    ``LONGTUNE_EMU_GLOBAL_RACES`` is ``0``), every emulated launch records which block wrote,
    read and atomically updated each global byte, and a plain access to a byte that another block
    of the same launch writes (or updates atomically) raises a report naming the kernel, the
    tensor, the byte offset and both blocks: on a GPU the blocks of one launch run in no fixed
    order. The previous setting is restored on exit. Raises if this build has no emulator."""
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be a bool, got {enabled!r}")
    set_check = emulated("set_global_race_check")
    previous = set_check(enabled)
    try:
        yield
    finally:
        set_check(previous)


class EmulatorCounters:
    """The launches recorded by :func:`emulator_counters`: ``launches`` is a list of dicts, one per
    emulated kernel launch in launch order (filled when the ``with`` block exits), with the keys

    - ``kernel`` (name), ``grid`` and ``block`` (``[x, y, z]``), ``smem_bytes`` (dynamic shared
      memory per block), ``blocks``, ``threads`` (summed over blocks);
    - ``barriers``: completed ``sync_block()`` barriers, summed over blocks;
    - ``mma_m16n8k16``, ``mma_m16n8k8`` (warp-level ``mma.sync`` instructions by shape) and
      ``mma_flops`` (2 m n k per instruction);
    - ``ldmatrix`` (warp-level instructions) and ``ldmatrix_bytes`` (128 per 8x8 matrix);
    - ``cp_async`` (16-byte copies) and ``cp_async_bytes``;
    - ``global_read_bytes``, ``global_write_bytes``, ``shared_read_bytes``,
      ``shared_write_bytes``: the bytes the kernel's code accesses (shared reads include
      ``ldmatrix``, shared writes ``cp.async`` destinations, global reads ``cp.async`` sources; an
      atomic read-modify-write is one read and one write of its element);
    - ``global_by_tensor``: ``{name: {"read": bytes, "written": bytes}}`` per global tensor, by the
      name the kernel gives it (``make_gptr``; e.g. ``"q"``, ``"k"``, ``"v"`` in attention)."""

    def __init__(self) -> None:
        self.launches: list[dict] = []

    def kernels(self, prefix: str = "") -> list[dict]:
        """The launches whose kernel name starts with ``prefix``."""
        return [r for r in self.launches if r["kernel"].startswith(prefix)]

    def total(self, key: str, prefix: str = "") -> int:
        """``key`` summed over the launches whose kernel name starts with ``prefix``."""
        return sum(r[key] for r in self.kernels(prefix))

    def tensor_bytes(self, name: str, prefix: str = "") -> tuple[int, int]:
        """(bytes read, bytes written) of global tensor ``name``, summed over the launches whose
        kernel name starts with ``prefix``."""
        read = written = 0
        for r in self.kernels(prefix):
            t = r["global_by_tensor"].get(name)
            if t is not None:
                read += t["read"]
                written += t["written"]
        return read, written


@contextlib.contextmanager
def emulator_counters() -> Iterator[EmulatorCounters]:
    """Counts what every emulated kernel launched inside the block issues (mma FLOPs, ldmatrix /
    cp.async / global / shared bytes, barriers, blocks, threads); the records are in the yielded
    object's ``launches`` once the block exits (see :class:`EmulatorCounters`). Counting does not
    change any result; it is off outside such a block. Raises if this build has no emulator."""
    set_counters = emulated("set_counters")
    read = emulated("counters")
    reset = emulated("reset_counters")
    previous = set_counters(True)
    start = len(read())
    c = EmulatorCounters()
    try:
        yield c
    finally:
        records = read()[start:]
        set_counters(previous)
        if not previous:
            reset()
        c.launches = [json.loads(r) for r in records]


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_2x(
    out: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor, what: str = ""
):
    """The kernel's error against the float64 reference must be at most twice the error of the
    PyTorch reference computed in the same dtype (plus one unit in the last place of the result's
    magnitude, so that exact small cases where PyTorch's error is 0 still compare)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == torch_same_dtype.dtype, (
        f"{what}: dtype {out.dtype} != {torch_same_dtype.dtype}"
    )
    err = max_abs_err(out, ref64)
    base = max_abs_err(torch_same_dtype, ref64)
    ulp = torch.finfo(out.dtype).eps * (ref64.abs().max().item() if ref64.numel() else 0.0)
    assert err <= 2 * base + ulp, (
        f"{what}: kernel error {err:.3e} > 2 x PyTorch error {base:.3e} (+ulp {ulp:.1e})"
    )
