"""Sequence parallelism on ``torch.distributed``: each rank holds a contiguous shard of every
sequence.

- :func:`s2_attention_sp`: causal S^2-Attn over the sharded sequence (halo or Ulysses exchange),
  or full causal attention (ring or Ulysses), exactly the rows of the single-process
  ``longtune.sparse_attention``.
- :func:`shard_batch`, :func:`shard_sequence`, :func:`global_token_count`: splitting a batch
  (labels shifted before the split) and normalising the loss by the global number of targets.
- :func:`count_comm`: bytes sent by these functions.
- :func:`patch_sequence_parallel` (or ``longtune.patch(..., sequence_parallel=group)``): a
  Hugging Face model patched by ``longtune.patch`` trains on sequence shards;
  :func:`sum_gradients` sums the ranks' gradients.

Not imported by ``import longtune``: ``import longtune.distributed``."""

from .attention import SP_MODES, halo_rows, head_split, s2_attention_sp, sp_mode
from .comm import CommStats, CommTimeoutError, count_comm
from .hf import patch_sequence_parallel, sum_gradients, unpatch_sequence_parallel
from .sharding import (
    IGNORE_INDEX,
    ShardedBatch,
    global_token_count,
    shard_batch,
    shard_sequence,
    shift_labels,
)

__all__ = [
    "s2_attention_sp",
    "sp_mode",
    "halo_rows",
    "head_split",
    "SP_MODES",
    "shard_batch",
    "shard_sequence",
    "shift_labels",
    "ShardedBatch",
    "global_token_count",
    "IGNORE_INDEX",
    "count_comm",
    "CommStats",
    "CommTimeoutError",
    "patch_sequence_parallel",
    "unpatch_sequence_parallel",
    "sum_gradients",
]
