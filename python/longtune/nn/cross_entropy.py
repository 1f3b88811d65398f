"""``ChunkedLMHead``: a drop-in for ``lm_head`` + cross-entropy whose memory does not grow with the
vocabulary (``longtune.linear_cross_entropy``: the logits are never materialised)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.cross_entropy import linear_cross_entropy


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    shift: bool = True,
    rows: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    class_weight: Optional[torch.Tensor] = None,
    return_z_loss: bool = False,
    return_accuracy: bool = False,
    return_predictions: bool = False,
):
    """The causal-LM loss through :func:`longtune.linear_cross_entropy` (logits never materialised),
    shared by :class:`ChunkedLMHead` and ``longtune.patch(model, lm_head="fused_ce")``: with
    ``shift`` position t of ``hidden`` (.., N, d) predicts ``labels[..., t + 1]`` (the last position
    has no target, ``rows`` is shifted with the labels); without, ``labels`` are already aligned
    with the positions (transformers' ``shift_labels``). ``class_weight`` and the ``return_*``
    extras as in :func:`longtune.linear_cross_entropy` (with them the result is a
    :class:`~longtune.LinearCrossEntropyOutput`; with ``shift`` the predictions cover positions
    0 .. N-2, the ones that have a target)."""
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
        if rows is not None:
            rows = rows[..., 1:]
    return linear_cross_entropy(
        hidden,
        weight,
        labels,
        bias,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        rows=rows,
        class_weight=class_weight,
        return_z_loss=return_z_loss,
        return_accuracy=return_accuracy,
        return_predictions=return_predictions,
    )


class ChunkedLMHead(nn.Module):
    """Wraps (or shares the weight of) an ``nn.Linear`` vocabulary head.

    ``forward(hidden)`` returns the logits like the linear layer; ``forward(hidden, labels)``
    returns the causal-LM loss (labels shifted by one inside, ``ignore_index`` skipped) without
    materialising the logits. Options as in :func:`longtune.linear_cross_entropy`; ``rows`` selects
    positions (e.g. answer tokens only).

    ``class_weight`` (V,): per-vocabulary-entry loss weights (``F.cross_entropy``'s ``weight``),
    kept as a buffer so that it moves with the module and is saved in its ``state_dict``.
    ``forward(hidden, labels, return_z_loss=True / return_accuracy=True / return_predictions=True)``
    returns a :class:`~longtune.LinearCrossEntropyOutput` with those extras (detached, from the same
    pass) next to the loss."""

    def __init__(
        self,
        lm_head: nn.Linear,
        *,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        shift: bool = True,
        class_weight: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        if not isinstance(lm_head, nn.Linear):
            raise TypeError(f"ChunkedLMHead wraps an nn.Linear, got {type(lm_head).__name__}")
        if class_weight is not None:
            if not isinstance(class_weight, torch.Tensor) or class_weight.shape != (
                lm_head.out_features,
            ):
                got = (
                    tuple(class_weight.shape)
                    if isinstance(class_weight, torch.Tensor)
                    else type(class_weight).__name__
                )
                raise ValueError(
                    f"ChunkedLMHead: class_weight must be a tensor of shape "
                    f"({lm_head.out_features},) (one weight per vocabulary entry), got {got}"
                )
            if not class_weight.is_floating_point():
                raise ValueError(
                    f"ChunkedLMHead: class_weight must be floating point, got {class_weight.dtype}"
                )
            class_weight = class_weight.detach().clone()
        self.register_buffer("class_weight", class_weight)
        self.head = lm_head
        self.ignore_index, self.label_smoothing, self.z_loss, self.softcap = (
            ignore_index,
            label_smoothing,
            z_loss,
            softcap,
        )
        self.shift = shift

    @property
    def weight(self):
        return self.head.weight

    def forward(
        self,
        hidden: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        reduction: str = "mean",
        rows: Optional[torch.Tensor] = None,
        return_z_loss: bool = False,
        return_accuracy: bool = False,
        return_predictions: bool = False,
    ):
        if labels is None:
            logits = self.head(hidden)
            return self.softcap * torch.tanh(logits / self.softcap) if self.softcap else logits
        return causal_lm_loss(
            hidden,
            self.head.weight,
            labels,
            self.head.bias,
            shift=self.shift,
            rows=rows,
            ignore_index=self.ignore_index,
            reduction=reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            class_weight=self.class_weight,
            return_z_loss=return_z_loss,
            return_accuracy=return_accuracy,
            return_predictions=return_predictions,
        )
