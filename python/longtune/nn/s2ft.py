"""``S2FTLinear`` (S²FT): a frozen linear layer of which one contiguous block of output rows
(``dim="out"``: v / up projections) or input columns (``dim="in"``: o / down projections) trains,
updated in place in the layer's own weight storage.

Partial backprop: ``dX = dY W`` as usual, but the weight gradient is computed for the block only:
``dW[rows] = dY[:, rows]^T X`` or ``dW[:, cols] = dY^T X[:, cols]`` - and for ``dim="in"`` only
``X[:, cols]`` is saved for backward, not X. Gradients accumulate across micro-batches (autograd's
``.grad +=``); the optimizer sees only the block (so weight decay touches only the block).
"""
from __future__ import annotations

import torch
from torch import nn


class _S2FTFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, part, weight, bias, lo, hi, dim):
        ctx.dim, ctx.lo, ctx.hi = dim, lo, hi
        saved_x = x if dim == "out" else x[..., lo:hi].contiguous()
        ctx.save_for_backward(saved_x, weight)
        ctx.bias_grad = bias is not None and bias.requires_grad
        return nn.functional.linear(x, weight, bias)  # `part` lives inside `weight`'s storage

    @staticmethod
    def backward(ctx, gy):
        xs, weight = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        x2 = xs.reshape(-1, xs.shape[-1])
        gx = gy @ weight if ctx.needs_input_grad[0] else None
        gpart = None
        if ctx.needs_input_grad[1]:
            gpart = g2[:, ctx.lo:ctx.hi].T @ x2 if ctx.dim == "out" else g2.T @ x2
        gb = g2.sum(0) if ctx.bias_grad else None
        return gx, gpart, None, gb, None, None, None


class S2FTLinear(nn.Module):
    def __init__(self, base: nn.Linear, lo: int, hi: int, dim: str = "out"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"S2FTLinear: base must be an nn.Linear, got {type(base).__name__}")
        if dim not in ("out", "in"):
            raise ValueError(f"S2FTLinear: dim must be 'out' (rows) or 'in' (columns), got {dim!r}")
        size = base.out_features if dim == "out" else base.in_features
        if not (0 <= lo < hi <= size):
            raise ValueError(f"S2FTLinear: the trainable block [{lo}, {hi}) must be a non-empty range inside "
                             f"[0, {size}) ({'out' if dim == 'out' else 'in'}_features)")
        self.base, self.lo, self.hi, self.dim = base, lo, hi, dim
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        view = base.weight.data[lo:hi] if dim == "out" else base.weight.data[:, lo:hi]
        self.part = nn.Parameter(view)  # shares storage with base.weight: updates land in place
        self.register_buffer("original_part", view.detach().clone(), persistent=False)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @torch.no_grad()
    def adapter(self) -> torch.Tensor:
        """The learned update of the block (trained minus original), for serving as an adapter."""
        return self.part.detach() - self.original_part

    @torch.no_grad()
    def unfuse(self) -> torch.Tensor:
        """Restore the original block in the weight and return the update (an adapter)."""
        delta = self.adapter()
        self.part.copy_(self.original_part)
        return delta

    @torch.no_grad()
    def fuse(self, delta: torch.Tensor) -> None:
        """Apply an adapter (from ``unfuse`` / ``adapter``) to the block, in place."""
        if delta.shape != self.part.shape:
            raise ValueError(f"S2FTLinear.fuse: adapter shape {tuple(delta.shape)} != block {tuple(self.part.shape)}")
        self.part.copy_(self.original_part + delta.to(self.part))

    def forward(self, x):
        return _S2FTFn.apply(x, self.part, self.base.weight, self.base.bias, self.lo, self.hi, self.dim)

    def extra_repr(self):
        return f"{self.base.in_features} -> {self.base.out_features}, trainable {self.dim} [{self.lo}, {self.hi})"
