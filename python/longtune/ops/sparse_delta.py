"""Sparse-delta (SpIEL) ops: ``torch.ops.longtune.sparse_delta_grad`` and its fake kernel."""
from __future__ import annotations

import torch

_OP = torch.ops.longtune.sparse_delta_grad


def sparse_delta_grad(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """Gradient of sparse deltas at flat ``indices`` (r * in_features + c) of a linear layer's weight,
    without forming the dense dW: ``out[k] = sum_t grad_out[t, r_k] * x[t, c_k]``.
    ``indices`` must be int64, strictly increasing, in range (checked)."""
    return _OP(grad_out, x, indices, int(in_features))


@torch.library.register_fake("longtune::sparse_delta_grad")
def _fake(grad_out, x, indices, in_features):
    torch._check(indices.dim() == 1, lambda: "longtune.sparse_delta_grad: indices must be 1-D")
    return torch.empty(indices.shape, dtype=grad_out.dtype, device=grad_out.device)
