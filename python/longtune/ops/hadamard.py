"""Fast Walsh-Hadamard transform: ``longtune.hadamard_transform`` and ``longtune.hadamard_matrix``.

For n = 2^k the result equals ``x @ H * scale`` with the Sylvester-ordered H
(``scipy.linalg.hadamard(n)``): the same numbers as ``fast_hadamard_transform.hadamard_transform(x,
scale)`` when scale is passed (the default here is 1/sqrt(n), there 1.0). For n = m * 2^k,
``H = kron(H_m, H_{2^k})`` with H_m on the left (the outer index): see ``hadamard_matrix``.
After scaling by 1/sqrt(n) the transform is exactly orthogonal for every supported n.
That package's exact contract (its defaults, its fixed 12/20/28/40 factors and composition, its
zero-padding) is ``longtune.compat.fast_hadamard_transform``.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from ..reference import hadamard as _ref

_OP = torch.ops.longtune.hadamard_transform
_OP_BWD = torch.ops.longtune.hadamard_transform_backward


def hadamard_transform(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Walsh-Hadamard transform over the last dimension: ``(x @ hadamard_matrix(n)) * scale``.

    Args:
        x: float32 / float16 / bfloat16 tensor (float64 on CPU), any leading shape, any strides.
            The last dimension n must be 2^k or m * 2^k with a constructible Hadamard factor m
            (12, 20, 28, 36, 40, 44, 52, 60, 76, 108, 140, 148, 156, 172, ...), n <= 32768.
        scale: multiplier applied to the result; defaults to 1/sqrt(n) (orthonormal transform).

    Accumulates in fp32 (fp64 for float64). Differentiable: the backward is the transposed
    transform (``torch.ops.longtune.hadamard_transform_backward``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"longtune.hadamard_transform: x must be a torch.Tensor, got {type(x).__name__}"
        )
    if scale is None:
        if x.dim() == 0:
            raise ValueError(
                "longtune.hadamard_transform: x must have at least 1 dimension, got a 0-dim tensor"
            )
        scale = 1.0 / math.sqrt(x.shape[-1]) if x.shape[-1] > 0 else 1.0
    return _OP(x, float(scale))


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float32, device=None, normalized: bool = False
) -> torch.Tensor:
    """The n x n Hadamard matrix used by ``hadamard_transform`` (entries +-1, or +-1/sqrt(n)).

    ``hadamard_transform(x, s) == x @ hadamard_matrix(n) * s`` (up to rounding).
    """
    n = int(n)
    if not _ref.is_supported(n):
        raise ValueError(
            f"longtune.hadamard_matrix: n={n} is not a supported size: n = 2^k or "
            f"m*2^k with a constructible factor m, n <= {_ref.MAX_N}"
        )
    H = _matrix64(n)
    if normalized:
        H = H / math.sqrt(n)
    return H.to(dtype=dtype, device=device)


@torch.compiler.assume_constant_result
def _matrix64(n: int) -> torch.Tensor:
    # a constant of n: torch.compile calls this once while tracing and embeds the result (the
    # construction checks H H^T = n I, which a graph could not branch on)
    return _ref.hadamard_matrix(n, dtype=torch.float64)


# ------------------------------------------------------------------ fake (meta) kernels
def _fake(x: torch.Tensor, scale: float) -> torch.Tensor:
    torch._check(
        x.dim() >= 1, lambda: "longtune.hadamard_transform: x must have at least 1 dimension"
    )
    torch._check(
        x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64),
        lambda: f"longtune.hadamard_transform: x must be a floating tensor, got {x.dtype}",
    )
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


torch.library.register_fake("longtune::hadamard_transform")(_fake)
torch.library.register_fake("longtune::hadamard_transform_backward")(_fake)


# ------------------------------------------------------------------ autograd
def _setup_context(ctx, inputs, output):
    ctx.scale = inputs[1]


def _backward(ctx, grad):
    return _OP_BWD(grad.contiguous(), ctx.scale), None


def _backward_of_backward(ctx, grad):
    return _OP(grad.contiguous(), ctx.scale), None


torch.library.register_autograd(
    "longtune::hadamard_transform", _backward, setup_context=_setup_context
)
torch.library.register_autograd(
    "longtune::hadamard_transform_backward", _backward_of_backward, setup_context=_setup_context
)


# ------------------------------------------------------------------ FLOP formula
def hadamard_flops(shape) -> int:
    """Additions of the fast algorithm: rows * n * (log2(2^k) + m) for n = m * 2^k."""
    n = int(shape[-1])
    rows = math.prod(int(s) for s in shape[:-1])
    p = _ref.plan(n)
    if p is None:
        return 0
    m, k = p
    return rows * n * (k + (m if m > 1 else 0))


@register_flop_formula(_OP)
def _flops(x_shape, *args, **kwargs) -> int:
    return hadamard_flops(x_shape)


@register_flop_formula(_OP_BWD)
def _flops_bwd(x_shape, *args, **kwargs) -> int:
    return hadamard_flops(x_shape)
