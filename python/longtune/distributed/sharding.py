"""Splitting a batch into contiguous per-rank sequence shards (rank r of W holds tokens
[r * L, (r + 1) * L), L = N / W) and counting the global number of target tokens."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from .comm import group_rank_size

IGNORE_INDEX = -100


def _shard_len(n: int, world: int, what: str) -> int:
    if n % world:
        raise ValueError(
            f"longtune.distributed: {what} has sequence length {n}, which is not a multiple of the "
            f"world size {world} (pad the sequence to a multiple of {world}, e.g. to "
            f"{-(-n // world) * world}, with labels {IGNORE_INDEX} on the padding)"
        )
    return n // world


def shard_sequence(tensor: torch.Tensor, dim: int = 1, group=None) -> torch.Tensor:
    """This rank's contiguous shard of ``tensor`` along ``dim`` (a view): rank r of W gets
    [r * L, (r + 1) * L) with L = size / W. A size that is not a multiple of W is refused."""
    _, rank, world = group_rank_size(group, "shard_sequence")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"longtune.distributed.shard_sequence: tensor must be a torch.Tensor, got "
            f"{type(tensor).__name__}"
        )
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(
            f"longtune.distributed.shard_sequence: dim={dim} is out of range for a "
            f"{tensor.dim()}-D tensor"
        )
    n_loc = _shard_len(tensor.shape[dim], world, f"the tensor of shape {tuple(tensor.shape)}")
    return tensor.narrow(dim, rank * n_loc, n_loc)


class ShardedBatch(NamedTuple):
    """This rank's part of a batch: input_ids / labels / position_ids (B, L) and, when given, the
    attention_mask (B, L). ``labels`` are already shifted (aligned with the positions: labels[t]
    is the target of token t; the last token of the sequence has ``-100``)."""

    input_ids: torch.Tensor
    labels: Optional[torch.Tensor]
    position_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels (.., N) -> (.., N) with out[..., t] = labels[..., t + 1] and ``ignore_index`` last."""
    pad = labels.new_full((*labels.shape[:-1], 1), ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def shard_batch(
    input_ids: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    group=None,
    ignore_index: int = IGNORE_INDEX,
) -> ShardedBatch:
    """Splits a (B, N) batch into this rank's contiguous shard (tokens [r * L, (r + 1) * L)).

    The labels are shifted by one over the WHOLE sequence before the split, so the last token of a
    shard keeps its target (the first token of the next shard); use a loss that does not shift
    again (``longtune.nn.cross_entropy.causal_lm_loss(..., shift=False)``, transformers'
    ``shift_labels``). ``position_ids`` (default ``arange(N)``) are global positions. N must be a
    multiple of W."""
    _, rank, world = group_rank_size(group, "shard_batch")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"longtune.distributed.shard_batch: input_ids must be a (batch, seq_len) tensor, got "
            f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids!r}"
        )
    shape = tuple(input_ids.shape)
    for name, t in (
        ("labels", labels),
        ("position_ids", position_ids),
        ("attention_mask", attention_mask),
    ):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"longtune.distributed.shard_batch: {name} must have input_ids' shape {shape}, "
                f"got {tuple(t.shape)}"
            )
    n_loc = _shard_len(shape[1], world, "input_ids")
    if position_ids is None:
        position_ids = torch.arange(shape[1], device=input_ids.device).expand(shape)
    if labels is not None:
        labels = shift_labels(labels, ignore_index)

    def cut(t):
        return None if t is None else t[:, rank * n_loc : (rank + 1) * n_loc]

    return ShardedBatch(cut(input_ids), cut(labels), cut(position_ids), cut(attention_mask))


def global_token_count(labels: torch.Tensor, group=None, ignore_index: int = IGNORE_INDEX) -> int:
    """The number of targets (labels != ``ignore_index``) summed over the ranks of ``group``: the
    denominator that makes the per-rank sums of the token losses add up to the mean over the whole
    sequence (an all-reduce; every rank must call it)."""
    group, _, _ = group_rank_size(group, "global_token_count")
    n = (labels != ignore_index).sum().to(torch.int64).reshape(1)
    dist.all_reduce(n, group=group)
    return int(n.item())
