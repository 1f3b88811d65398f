"""Pure-PyTorch references of the sparse-delta (SpIEL) ops."""

import torch


def sparse_delta_grad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    in_features: int,
    compute_dtype=torch.float64,
) -> torch.Tensor:
    """The dense dW = grad_out^T x gathered at the flat indices (what the official code
    computes)."""
    g = grad_out.reshape(-1, grad_out.shape[-1]).to(compute_dtype)
    xx = x.reshape(-1, in_features).to(compute_dtype)
    return (g.T @ xx).reshape(-1)[indices].to(grad_out.dtype)


def sparse_delta_linear(x, weight, bias, indices, values):
    """y = x (W + scatter(values at indices))^T + b."""
    w = weight.reshape(-1).index_add(0, indices, values.to(weight.dtype)).reshape(weight.shape)
    return torch.nn.functional.linear(x, w, bias)
