"""Rotated fake quantization (RoSTE): ``longtune.rotate_fake_quant`` and ``longtune.quantize``.

``rotate_fake_quant(x)`` = ``Q(R x)``: R is the orthonormal Hadamard rotation over the last
dimension - exactly ``longtune.hadamard_transform(x)`` (or block-diagonal with blocks of
``hadamard_size``) - and Q a b-bit quantize-dequantize per token (the whole last dimension) or per
group of ``group_size`` elements, symmetric or asymmetric, with a clip ratio; see
``csrc/common/quant.h`` for the exact arithmetic (round half to even, scale floor 1e-8). One pass
over memory: the rotation, the group statistics and the quantization are fused.

Backward (straight-through estimator): ``grad_x = R^T (mask * grad)`` with ``mask = 1``
(``ste="identity"``, as in RoSTE) or ``mask = [the element's code was inside the code range]``
(``ste="clip"``).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ..reference import hadamard as _had_ref

_OP = torch.ops.longtune.rotate_fake_quant
_OP_BWD = torch.ops.longtune.rotate_fake_quant_backward
_OP_CODES = torch.ops.longtune.rotate_quantize

_GRANULARITIES = ("per_token", "per_group")
_STE = ("identity", "clip")


def _normalize(x, bits, granularity, group_size, clip_ratio, rotate, hadamard_size, ste):
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"longtune.rotate_fake_quant: x must be a torch.Tensor, got {type(x).__name__}"
        )
    if granularity not in _GRANULARITIES:
        raise ValueError(
            f"longtune.rotate_fake_quant: granularity must be one of {_GRANULARITIES}, got "
            f"{granularity!r}"
        )
    if granularity == "per_group" and group_size is None:
        raise ValueError("longtune.rotate_fake_quant: granularity='per_group' needs group_size")
    if ste not in _STE:
        raise ValueError(f"longtune.rotate_fake_quant: ste must be one of {_STE}, got {ste!r}")
    return (
        int(bits),
        granularity,
        int(group_size or 0),
        float(clip_ratio),
        bool(rotate),
        int(hadamard_size or 0),
    )


def rotate_fake_quant(
    x: torch.Tensor,
    *,
    bits: int = 4,
    granularity: str = "per_token",
    group_size: int | None = None,
    symmetric: bool = True,
    clip_ratio: float = 1.0,
    rotate: bool = True,
    hadamard_size: int | None = None,
    ste: str = "identity",
) -> torch.Tensor:
    """Quantize-dequantize ``x`` after an orthonormal Hadamard rotation of its last dimension.

    Args:
        x: float32 / float16 / bfloat16, any leading shape; returns x's dtype and shape.
        bits: 2, 3, 4 or 8.
        granularity: ``"per_token"`` (one scale per row of the last dimension) or ``"per_group"``
            (one scale per ``group_size`` consecutive elements; must divide the last dimension).
        symmetric: codes in [-2^(b-1), 2^(b-1)-1] (True) or [0, 2^b-1] with a zero point (False).
        clip_ratio: in (0, 1]; the range (max|x|, or min/max) is shrunk by this factor.
        rotate: apply the rotation first (False: a plain fake quantizer, e.g. for weights).
        hadamard_size: rotate in blocks of this size (block-diagonal); default the whole dimension.
        ste: ``"identity"`` or ``"clip"`` straight-through gradient.
    """
    b, g, gs, c, r, hs = _normalize(
        x, bits, granularity, group_size, clip_ratio, rotate, hadamard_size, ste
    )
    return _OP(x, b, g, gs, bool(symmetric), c, r, hs, ste)


def quantize(
    x: torch.Tensor,
    *,
    bits: int = 4,
    granularity: str = "per_token",
    group_size: int | None = None,
    symmetric: bool = True,
    clip_ratio: float = 1.0,
    rotate: bool = True,
    hadamard_size: int | None = None,
):
    """The integer side of ``rotate_fake_quant``: ``(codes, scales, zeros)``.

    codes: int8 (symmetric) or uint8 (asymmetric), x's shape; scales / zeros: float32 of shape
    ``x.shape[:-1] + (groups,)``. ``(codes - zeros) * scales`` (per group) reproduces
    ``rotate_fake_quant`` in float32.
    """
    b, g, gs, c, r, hs = _normalize(
        x, bits, granularity, group_size, clip_ratio, rotate, hadamard_size, "identity"
    )
    return _OP_CODES(x, b, g, gs, bool(symmetric), c, r, hs)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype=torch.float32
) -> torch.Tensor:
    """Inverse of ``quantize`` up to the quantization error (still in the rotated basis)."""
    groups = scales.shape[-1]
    cg = codes.to(torch.float32).reshape(*codes.shape[:-1], groups, codes.shape[-1] // groups)
    return ((cg - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(codes.shape).to(dtype)


def quantize_weight(
    w: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = True,
    clip_ratio: float = 1.0,
) -> torch.Tensor:
    """Fake-quantize a weight [out, in] per output channel (group_size None) or per group of
    ``group_size`` input channels (no rotation: rotate frozen weights once, beforehand)."""
    return rotate_fake_quant(
        w,
        bits=bits,
        granularity="per_group" if group_size else "per_token",
        group_size=group_size,
        symmetric=symmetric,
        clip_ratio=clip_ratio,
        rotate=False,
    )


# ------------------------------------------------------------------ fake (meta) kernels
def _groups(x, granularity, group_size):
    return 1 if granularity == "per_token" else x.shape[-1] // max(group_size, 1)


@torch.library.register_fake("longtune::rotate_fake_quant")
def _fake(x, bits, granularity, group_size, symmetric, clip_ratio, rotate, hadamard_size, ste_mode):
    torch._check(
        x.dim() >= 1, lambda: "longtune.rotate_fake_quant: x must have at least 1 dimension"
    )
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("longtune::rotate_fake_quant_backward")
def _fake_bwd(
    grad, x, bits, granularity, group_size, symmetric, clip_ratio, rotate, hadamard_size, ste_mode
):
    return torch.empty(x.shape, dtype=grad.dtype, device=grad.device)


@torch.library.register_fake("longtune::rotate_quantize")
def _fake_codes(x, bits, granularity, group_size, symmetric, clip_ratio, rotate, hadamard_size):
    codes = torch.empty(x.shape, dtype=torch.int8 if symmetric else torch.uint8, device=x.device)
    gshape = (*x.shape[:-1], _groups(x, granularity, group_size))
    return (
        codes,
        torch.empty(gshape, dtype=torch.float32, device=x.device),
        torch.empty(gshape, dtype=torch.float32, device=x.device),
    )


# ------------------------------------------------------------------ autograd (straight-through)
def _setup_context(ctx, inputs, output):
    x, *rest = inputs
    ctx.save_for_backward(x)
    ctx.rest = rest


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    gx = _OP_BWD(grad.contiguous(), x, *ctx.rest)
    return (gx,) + (None,) * len(ctx.rest)


torch.library.register_autograd(
    "longtune::rotate_fake_quant", _backward, setup_context=_setup_context
)


# rotate_quantize: integer codes and their scales / zeros carry no gradient (the differentiable
# path is rotate_fake_quant); declared so, eager and compiled graphs treat the outputs as constants
def _codes_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _codes_backward(ctx, *grads):
    return (None,) * 8


torch.library.register_autograd(
    "longtune::rotate_quantize", _codes_backward, setup_context=_codes_setup_context
)


# ------------------------------------------------------------------ FLOP formula
def quant_flops(shape, rotate: bool, hadamard_size: int) -> int:
    """Rotation additions (as for hadamard_transform) + ~6 ops per element for the quantizer."""
    n = int(shape[-1])
    rows = 1
    for s in shape[:-1]:
        rows *= int(s)
    rot = 0
    if rotate:
        h = hadamard_size if hadamard_size and hadamard_size > 0 else n
        p = _had_ref.plan(h)
        if p is not None:
            m, k = p
            rot = rows * n * (k + (m if m > 1 else 0))
    return rot + 6 * rows * n


@register_flop_formula(_OP)
def _flops(
    x_shape,
    bits,
    granularity,
    group_size,
    symmetric,
    clip_ratio,
    rotate,
    hadamard_size,
    ste_mode,
    *a,
    **k,
):
    return quant_flops(x_shape, rotate, hadamard_size)
