"""Sparse-delta (SpIEL) ops: ``torch.ops.longtune.sparse_delta_grad`` and its fake kernel."""

from __future__ import annotations

import torch

_OP = torch.ops.longtune.sparse_delta_grad


def sparse_delta_grad(
    grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int
) -> torch.Tensor:
    """Gradient of sparse deltas at flat ``indices`` (r * in_features + c) of a linear layer's
    weight, without forming the dense dW: ``out[k] = sum_t grad_out[t, r_k] * x[t, c_k]``.
    ``indices`` must be int64, strictly increasing, in range (checked)."""
    return _OP(grad_out, x, indices, int(in_features))


@torch.library.register_fake("longtune::sparse_delta_grad")
def _fake(grad_out, x, indices, in_features):
    torch._check(indices.dim() == 1, lambda: "longtune.sparse_delta_grad: indices must be 1-D")
    return torch.empty(indices.shape, dtype=grad_out.dtype, device=grad_out.device)


def sparse_adamw_(
    values, grad, exp_avg, exp_avg_sq, age, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
):
    """Fused in-place AdamW step over sparse deltas with a per-element step count ``age`` (int32),
    so deltas regrown later get their own bias correction. ``exp_avg``/``exp_avg_sq`` are
    float32."""
    torch.ops.longtune.sparse_adamw_(
        values,
        grad,
        exp_avg,
        exp_avg_sq,
        age,
        float(lr),
        float(betas[0]),
        float(betas[1]),
        float(eps),
        float(weight_decay),
    )


@torch.library.register_fake("longtune::sparse_adamw_")
def _fake_adamw(values, grad, exp_avg, exp_avg_sq, age, lr, beta1, beta2, eps, weight_decay):
    return None
