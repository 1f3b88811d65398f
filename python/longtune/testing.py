"""Test helpers: the emulated CUDA kernels and the error rule every kernel test uses."""

from __future__ import annotations

import contextlib
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
