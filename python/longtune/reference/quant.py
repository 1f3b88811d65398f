"""Pure-PyTorch reference of the rotated fake quantizer (the spec; see csrc/common/quant.h).

``fake_quant(x, ...)`` follows the same float32 operation sequence as the kernels (so kernels are
compared bit for bit); ``fake_quant(..., compute_dtype=torch.float64)`` is the float64 version of
the same formula (differs only where a float32 rounding of x / scale crosses a .5 boundary).
Rounding is round-half-to-even (torch.round), not half-away-from-zero.
"""

from __future__ import annotations

import math

import torch

from . import hadamard as _had

SCALE_FLOOR = 1e-8


def _groups(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    n = x.shape[-1]
    g = n if granularity == "per_token" else int(group_size)
    return x.reshape(*x.shape[:-1], n // g, g)


def qrange(bits: int, symmetric: bool):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def group_params(xg: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float, compute_dtype):
    qmin, qmax = qrange(bits, symmetric)
    floor = torch.tensor(SCALE_FLOOR, dtype=compute_dtype)
    clip = torch.tensor(clip_ratio, dtype=compute_dtype)
    if symmetric:
        amax = xg.abs().amax(-1, keepdim=True)
        scale = torch.maximum((clip * amax) / qmax, floor)
        zero = torch.zeros_like(scale)
    else:
        lo = clip * torch.clamp(xg.amin(-1, keepdim=True), max=0)
        hi = clip * torch.clamp(xg.amax(-1, keepdim=True), min=0)
        scale = torch.maximum((hi - lo) / qmax, floor)
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


def rotate(x: torch.Tensor, hadamard_size: int | None = None) -> torch.Tensor:
    """Block-diagonal orthonormal Hadamard rotation over the last dim (blocks of hadamard_size)."""
    n = x.shape[-1]
    h = n if not hadamard_size or hadamard_size <= 0 else hadamard_size
    xb = x.reshape(*x.shape[:-1], n // h, h)
    return _had.hadamard_transform(xb, 1 / math.sqrt(h)).reshape(x.shape)


def _unclamped_codes(x, bits, granularity, group_size, symmetric, clip_ratio, compute_dtype):
    """(round(x / scale) + zero per group, scale, zero) - the codes before clamping to the range."""
    xg = _groups(x.to(compute_dtype), granularity, group_size)
    scale, zero = group_params(xg, bits, symmetric, clip_ratio, compute_dtype)
    return torch.round(xg / scale) + zero, scale, zero


def quantize(
    x,
    bits=4,
    granularity="per_token",
    group_size=None,
    symmetric=True,
    clip_ratio=1.0,
    compute_dtype=torch.float32,
):
    """(codes, scales, zeros): codes in the signed / unsigned range, one scale / zero per group."""
    u, scale, zero = _unclamped_codes(
        x, bits, granularity, group_size, symmetric, clip_ratio, compute_dtype
    )
    qmin, qmax = qrange(bits, symmetric)
    return torch.clamp(u, qmin, qmax).reshape(x.shape), scale.squeeze(-1), zero.squeeze(-1)


def fake_quant(
    x,
    bits=4,
    granularity="per_token",
    group_size=None,
    symmetric=True,
    clip_ratio=1.0,
    compute_dtype=torch.float32,
):
    codes, scale, zero = quantize(
        x, bits, granularity, group_size, symmetric, clip_ratio, compute_dtype
    )
    cg = _groups(codes, granularity, group_size)
    return ((cg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(x.shape)


def in_range_mask(
    x,
    bits=4,
    granularity="per_token",
    group_size=None,
    symmetric=True,
    clip_ratio=1.0,
    compute_dtype=torch.float32,
):
    u, _, _ = _unclamped_codes(
        x, bits, granularity, group_size, symmetric, clip_ratio, compute_dtype
    )
    qmin, qmax = qrange(bits, symmetric)
    return ((u >= qmin) & (u <= qmax)).reshape(x.shape)


def rotate_fake_quant(
    x,
    bits=4,
    granularity="per_token",
    group_size=None,
    symmetric=True,
    clip_ratio=1.0,
    rotate_input=True,
    hadamard_size=None,
    compute_dtype=torch.float32,
):
    """Q(R x) with R the orthonormal (block) Hadamard rotation, in x's dtype."""
    r = rotate(x.to(torch.float32), hadamard_size) if rotate_input else x.to(torch.float32)
    return fake_quant(r, bits, granularity, group_size, symmetric, clip_ratio, compute_dtype).to(
        x.dtype
    )
