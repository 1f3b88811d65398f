"""Pure-PyTorch reference of the fused linear + cross-entropy (materialises the logits)."""

from __future__ import annotations

import torch


def linear_cross_entropy_rows(
    x,
    weight,
    target,
    bias=None,
    *,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    class_weight=None,
):
    """Per-row loss and lse (the op's forward), computed in x's dtype:
    z = softcap * tanh(l / softcap) (if softcap) with l = x W^T + b;
    loss = (1 - eps) w[target] (lse - z[target]) + eps / V sum_c w_c (lse - z_c) + z_loss * lse^2
    (w = class_weight, all 1 without), 0 for ignored rows."""
    logits = linear_logits(x, weight, bias, softcap=softcap)
    lse = torch.logsumexp(logits, dim=-1)
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    nll = lse - logits.gather(-1, t[:, None])[:, 0]
    if class_weight is not None:
        nll = nll * class_weight.to(nll.dtype)[t]
    loss = (1 - label_smoothing) * nll
    if label_smoothing:
        smooth = lse[:, None] - logits
        if class_weight is not None:
            smooth = smooth * class_weight.to(smooth.dtype)
        loss = loss + label_smoothing * smooth.mean(-1)
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss)), lse


def linear_logits(x, weight, bias=None, *, softcap=None):
    """The logits the loss sees (softcapped if softcap); their argmax is the op's prediction."""
    logits = x @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def linear_cross_entropy(
    x,
    weight,
    target,
    bias=None,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    class_weight=None,
):
    """``F.cross_entropy(x @ W.T + b, target, weight=class_weight)`` with the same options as the
    fused op: "mean" divides the cross-entropy by the non-ignored targets' weight sum (their count
    without class weights) and the z-loss term by the count of non-ignored rows."""
    kw = dict(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        softcap=softcap,
        class_weight=class_weight,
    )
    loss, lse = linear_cross_entropy_rows(x, weight, target, bias, **kw)
    valid = target != ignore_index
    zrows = torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse)) if z_loss else None
    if reduction == "none":
        return loss if zrows is None else loss + zrows
    if reduction == "sum":
        return loss.sum() if zrows is None else (loss + zrows).sum()
    n = valid.sum().clamp(min=1)
    if class_weight is None:
        return loss.sum() / n if zrows is None else (loss + zrows).sum() / n
    wsum = (class_weight.to(loss.dtype)[torch.where(valid, target, 0)] * valid).sum()
    return loss.sum() / wsum + (0 if zrows is None else zrows.sum() / n)
