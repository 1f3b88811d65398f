"""Pure-PyTorch reference of the fused linear + cross-entropy (materialises the logits)."""
from __future__ import annotations

import torch


def linear_cross_entropy_rows(x, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                              softcap=None):
    """Per-row loss and lse (the op's forward), computed in x's dtype:
    z = softcap * tanh(l / softcap) (if softcap) with l = x W^T + b;
    loss = (1 - eps) (lse - z[target]) + eps (lse - mean(z)) + z_loss * lse^2, 0 for ignored rows."""
    logits = x @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    nll = lse - logits.gather(-1, t[:, None])[:, 0]
    loss = (1 - label_smoothing) * nll
    if label_smoothing:
        loss = loss + label_smoothing * (lse - logits.mean(-1))
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss)), lse


def linear_cross_entropy(x, weight, target, bias=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, softcap=None):
    """``F.cross_entropy(x @ W.T + b, target)`` with the same options as the fused op."""
    loss, _ = linear_cross_entropy_rows(x, weight, target, bias, ignore_index=ignore_index,
                                        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    n = (target != ignore_index).sum()
    return loss.sum() / n.clamp(min=1)
