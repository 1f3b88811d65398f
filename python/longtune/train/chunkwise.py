"""Chunk-wise training of Hugging Face causal LMs: SeCO (sequential chunk-wise optimization, exact)
and SpaCO (sparse chunk-wise optimization, a stochastic estimator of that gradient), after "Training
Long-Context LLMs Efficiently via Chunk-wise Optimization" (Li et al.).

The sequence is cut into chunks of ``chunk_size`` tokens (the last one may be shorter).

- Phase 1 (no grad): the chunks run in order; chunk i attends to the keys / values of chunks
  0..i-1 through the model's cache interface (a ``transformers.cache_utils.Cache`` whose layers
  hand the attention ``buffer[..., :e]``), at positions ``past_len + arange(C)``. Each layer keeps
  the k / v of the whole sequence (k after rotary, as the cache stores it) in one buffer per
  tensor, chunk i at positions [s_i, e_i): the past is a view, never a concatenated copy.
  Phase 1 wants only the k/v, so a chunk's forward stops at its last layer's cache write: that
  layer's attention and MLP, the final norm and the vocabulary head never run in phase 1.
- Phase 2 (chunks in reverse order): chunk i is recomputed with grad; its cache layers write its new
  k / v into their slots through ``_SlotCat``, whose backward adds the earlier chunks' parts of
  dL/dk, dL/dv into per-chunk gradient tensors; then one ``torch.autograd.backward`` takes the
  local loss together with chunk i's own recomputed k / v, fed with the gradient that later chunks
  left for chunk i, which is then freed. The parameters' ``.grad`` accumulates over the chunks.
  Memory: one chunk's activations plus the sequence's K/V and their not-yet-relayed gradients.
The loss is the standard HF causal-LM loss: labels are shifted once for the whole sequence
(token t predicts ``labels[t+1]``; ``-100`` is ignored), so the target of the last token of chunk
i is the first label of chunk i+1; per-token cross-entropy is summed over all chunks and divided by
the number of target tokens of the whole batch (or ``num_items_in_batch``). SeCO's gradient is
therefore full backprop's (up to rounding).

SpaCO (``budget=K``): K of the N chunks are drawn uniformly without replacement (``generator``);
only those are recomputed and backpropagated; the others run in phase 1 only. The gradient is a sum
over paths ``loss of chunk i0 -> k/v of i1 -> ... -> parameters used by chunk im`` (m hops), and a
path survives only if all its m+1 chunks are sampled, with probability ``prod_{t<=m} (K-t)/(N-t)``.
Factors (:func:`spaco_factors`): a sampled chunk's own loss is multiplied by ``N/K``; the k/v
gradient relayed to a sampled chunk -- which already carries the sender's factors -- by
``(N-1)/(K-1)`` (given the sender is sampled, the receiver is with probability (K-1)/(N-1); a
constant N/K here would under-weight every relayed gradient). This makes the estimator exactly
unbiased for all 0- and 1-hop paths, i.e. for the whole gradient of a one-layer model. Exact
unbiasedness for every path is impossible with a fixed budget: a path through more than K chunks
is never observed (with K = 1 no relayed gradient is used at all), and paths of m >= 2 hops (which
need >= m layers: each hop goes down at least one layer) are weighted ``N/K ((N-1)/(K-1))^m``
instead of ``prod_t (N-t)/(K-t)``, i.e. slightly under-weighted. This residual bias is measured in
tests/test_chunkwise.py (a few per cent of the gradient norm on a tiny 2-layer model).

``cap`` (default 2.0, paper section 6.4) clips both factors, trading bias for variance: a cap
below ``N/K`` biases the local terms, a cap below ``(N-1)/(K-1)`` the relayed ones (the estimate
then shrinks). ``cap=None`` lifts the clipping. With ``K = N`` all factors are 1: SpaCO is SeCO.

Scope: a batch of rows (B >= 1), padded or not: ``attention_mask`` (B, N) is the model's padding
mask, and chunk i is run with its columns [0, e_i) -- the keys it sees -- as a cached forward is;
the positions are ``arange(N)`` as in the whole-sequence forward without ``position_ids`` (label
padded positions -100, as for full backprop). Models: HF causal LMs whose attention writes k/v
through ``cache.update(k, v, layer_idx)`` (Llama, Qwen2, Mistral, ..., also peft-wrapped, also
``longtune.patch(model, attention="causal")``).
Dropout is replayed identically in phase 2 (the RNG state of each chunk's phase-1 forward is
restored). S^2 attention (``longtune.patch(model, attention="s2")``) is reproduced chunk-wise
exactly: ``seco_backward`` declares the whole sequence's length
(:func:`longtune.integrations.hf.sequence_length`), so every chunk uses the group size full backprop
would use (``group_size``, or ``group_size_ratio`` times the sequence length, never the chunk's),
and a query chunk against the longer past KV gets exactly the full sequence's S^2 rows (groups are
absolute positions, queries bottom-right aligned; tested). ``mode="longlora_roll"`` (its last group
wraps around to the end of the sequence) and the inference-only Lambda-mask are refused before any
compute.
Sliding-window models keep the whole past (the mask applies the window).

DDP: pass the ``DistributedDataParallel``-wrapped model. Every chunk's forward + backward in phase
2 runs under ``model.no_sync()`` except the last one (the first sampled chunk), whose backward
all-reduces the gradient accumulated over all chunks: one gradient synchronisation per step, as
with ``loss.backward()`` on the whole sequence. Phase 1 runs without grad, so DDP does not expect a
backward for it. As with any DDP gradient accumulation, the last chunk's backward must reach every
parameter that DDP tracks (it does for a causal LM: chunk 0 uses all of them); models with unused
parameters need ``find_unused_parameters=True`` as usual.

FSDP2 (``torch.distributed.fsdp.fully_shard``): pass the sharded model itself (typically every
decoder layer and the root ``fully_shard``-ed). Every chunk's backward in phase 2 except the last
one runs with ``set_requires_gradient_sync(False)`` on every FSDP2 module (FSDP2's counterpart of
``no_sync()``: the unsharded gradients accumulate locally), and the last one reduce-scatters the
sum: one reduce-scatter per parameter group and step, as with ``loss.backward()``. The parameter
groups' sync flags are restored afterwards, so a caller that turned the sync off for its own
accumulation keeps it off (nothing is reduced then). Phase-1 forwards run to the end under FSDP2
(its forward hooks reshard the parameters and reset their state only when a module's forward
returns), with the vocabulary head for one position only (``logits_to_keep=1``) where the model
accepts it. The KV cache holds activations, not parameters, so resharding after forward does not
touch it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from ..integrations._common import base_model, hf_model
from ..integrations.hf import sequence_length

__all__ = ["seco_backward", "seco_train_step", "spaco_factors", "spaco_sample"]

IGNORE_INDEX = -100


class _KVStore:
    """One layer's keys and values of the whole sequence in two buffers (B, H, N, D), chunk i at
    positions [s_i, e_i) - a chunk attends to ``buffer[..., :e]``, a view, never a concatenated
    copy - and, in phase 2, the k / v gradients of the chunks whose gradient is relayed
    (``relayed``: chunk indices), one tensor per chunk, created by the first later chunk that sends
    one and freed once relayed."""

    def __init__(self, n: int, bounds: list, relayed: set):
        self.n, self.bounds, self.relayed = n, bounds, relayed
        self.k = self.v = None
        self.gk, self.gv = {}, {}  # chunk -> gradient

    def buffers(self, like: torch.Tensor):
        if self.k is None:
            shape = (*like.shape[:-2], self.n, like.shape[-1])
            self.k = like.new_empty(shape)
            self.v = like.new_empty(shape)
        return self.k, self.v

    def add_grad(self, grads: dict, g: torch.Tensor, s: int) -> None:
        """Adds the part of ``g`` (the gradient of ``buffer[..., :e]``) that belongs to relayed
        chunks before position ``s``."""
        for j in self.relayed:
            sj, ej = self.bounds[j]
            if ej > s:
                continue
            part = g[..., sj:ej, :]
            if j in grads:
                grads[j].add_(part)
            else:
                grads[j] = part.clone()


class _SlotCat(torch.autograd.Function):
    """``cat(buffer[..., :s], new)`` without the copy: writes the chunk's new k (or v) into its slot
    and returns ``buffer[..., :e]``. Backward: the past part of the incoming gradient is added into
    the layer's gradient buffer (relayed to those chunks when their turn comes), the chunk's own
    part goes back to ``new``."""

    @staticmethod
    def forward(ctx, new, buf, store, grads, s):
        e = s + new.shape[-2]
        buf[..., s:e, :].copy_(new)
        ctx.store, ctx.grads, ctx.s = store, grads, s
        return buf[..., :e, :]

    @staticmethod
    def backward(ctx, g):
        ctx.store.add_grad(ctx.grads, g, ctx.s)
        return g[..., ctx.s :, :], None, None, None, None


class _KVDone(Exception):
    """Raised by the chunk's last cache write in a phase-1 forward that only wants the k/v: the rest
    of the model (the last layer's attention and MLP, the final norm, the head) is skipped."""


class _ChunkLayerMixin:
    """One layer's cache for one chunk (positions [past_len, past_len + C)), a transformers
    ``DynamicLayer`` once :func:`_chunk_layer_class` mixes it in: ``update`` writes the
    chunk's new k/v into the layer's buffers and returns the buffers up to the chunk's end (views);
    with grad (phase 2) through ``_SlotCat``, so the earlier chunks' parts of the k/v gradient land
    in the store's per-chunk gradients. Remembers the new k/v. ``written``: a counter shared by the
    chunk's layers; with ``stop_after`` = the number of layers, the write that completes the set
    raises :class:`_KVDone`."""

    def __init__(
        self, store: _KVStore, past_len: int, grad: bool, written: list, stop_after: int = 0
    ):
        super().__init__()
        self.store, self.past_len, self.grad = store, past_len, grad
        self.written, self.stop_after = written, stop_after
        self.new_k = self.new_v = None
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device

    def update(self, key_states, value_states, *args, **kwargs):
        self.new_k, self.new_v = key_states, value_states
        kb, vb = self.store.buffers(key_states)
        s, e = self.past_len, self.past_len + key_states.shape[-2]
        if self.grad and torch.is_grad_enabled():
            st = self.store
            k = _SlotCat.apply(key_states, kb, st, st.gk, s) if key_states.requires_grad else None
            v = (
                _SlotCat.apply(value_states, vb, st, st.gv, s)
                if value_states.requires_grad
                else None
            )
        else:
            k = v = None
        with torch.no_grad():
            if k is None:
                kb[..., s:e, :].copy_(key_states)
            if v is None:
                vb[..., s:e, :].copy_(value_states)
        self.written[0] += 1
        if self.stop_after and self.written[0] == self.stop_after:
            raise _KVDone
        return (k if k is not None else kb[..., :e, :]), (v if v is not None else vb[..., :e, :])

    def get_seq_length(self) -> int:
        return self.past_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.past_len + query_length, 0

    def get_max_length(self) -> int:
        return -1


@functools.lru_cache(maxsize=None)
def _chunk_layer_class():
    """The chunk cache layer class; built on first use so that importing this module does not
    import transformers."""
    from transformers.cache_utils import DynamicLayer

    return type("_ChunkLayer", (_ChunkLayerMixin, DynamicLayer), {"__module__": __name__})


def _num_layers(model) -> int:
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    cfg = get(decoder=True) if callable(get) else cfg
    return int(cfg.num_hidden_layers)


def _unwrap_ddp(model):
    """(the DistributedDataParallel wrapper or None, the module it wraps or the model itself)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model, model.module
    return None, model


def _fsdp_modules(model) -> list:
    """The FSDP2 modules (``torch.distributed.fsdp.fully_shard``) in ``model``, outermost first;
    empty when there are none (or torch has no FSDP2)."""
    if not torch.distributed.is_available():
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def _fsdp_no_sync(modules: list):
    """FSDP2's counterpart of DDP's ``no_sync()``: the backwards inside accumulate the unsharded
    gradients without reduce-scatter (``set_requires_gradient_sync(False)`` on every FSDP2
    module); on exit each parameter group's reduce flags are restored as they were, so a caller
    that disabled the sync itself (gradient accumulation over several batches) keeps it disabled."""
    saved = []
    for m in modules:
        get = getattr(m, "_get_fsdp_state", None)
        groups = getattr(get(), "_fsdp_param_groups", None) if callable(get) else None
        flags = None  # the flags cannot be read: sync is turned back on
        if groups is not None and all(
            hasattr(g, "reduce_grads") and hasattr(g, "all_reduce_grads") for g in groups
        ):
            flags = [(g, g.reduce_grads, g.all_reduce_grads) for g in groups]
        saved.append((m, flags))
    for m in modules:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m, flags in saved:
            if flags is None:
                m.set_requires_gradient_sync(True, recurse=False)
            else:
                for g, reduce_grads, all_reduce_grads in flags:
                    g.reduce_grads, g.all_reduce_grads = reduce_grads, all_reduce_grads


def _forward_params(model) -> set:
    base = base_model(model)
    fwd = (
        getattr(base, "_longtune_orig_forward", None) or base.forward
    )  # the model's own, under a fused-CE patch
    try:
        return set(inspect.signature(fwd).parameters)
    except (TypeError, ValueError):
        return set()


def spaco_factors(n_chunks: int, budget: int, cap: Optional[float] = 2.0) -> tuple:
    """SpaCO's compensation factors ``(local, relay)`` for ``budget`` = K of ``n_chunks`` = N
    chunks sampled uniformly without replacement: ``local = N / K`` multiplies a sampled chunk's
    own loss (it is sampled with probability K/N); ``relay = (N - 1) / (K - 1)`` multiplies the k/v
    gradient relayed to a sampled chunk (it was sent by a sampled chunk, and given that, the
    receiver is sampled with probability (K-1)/(N-1)); ``relay = 0`` for K = 1 (a relayed gradient
    never meets a second sampled chunk). Both are clipped at ``cap`` (None: no clipping)."""
    n, k = int(n_chunks), int(budget)
    local = n / k
    relay = (n - 1) / (k - 1) if k > 1 else 0.0
    if cap is not None:
        local, relay = min(local, float(cap)), min(relay, float(cap))
    return local, relay


def spaco_sample(n_chunks: int, budget: int, generator: Optional[torch.Generator] = None) -> list:
    """The chunks SpaCO backpropagates: ``budget`` of ``n_chunks`` drawn uniformly without
    replacement from ``generator`` (what :func:`seco_backward` draws, in drawing order)."""
    return torch.randperm(n_chunks, generator=generator)[:budget].tolist()


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _check(input_ids, labels, chunk_size, budget, cap, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("seco_backward: input_ids and labels must be tensors")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if labels.dim() == 1:
        labels = labels.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(
            f"seco_backward: input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}"
        )
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"seco_backward: labels shape {tuple(labels.shape)} does not match input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    n = input_ids.shape[1]
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"seco_backward: chunk_size must be an int, got {chunk_size!r}")
    if not 1 <= chunk_size <= n:
        raise ValueError(
            f"seco_backward: chunk_size must be in [1, seq_len={n}], got chunk_size={chunk_size}"
        )
    n_chunks = math.ceil(n / chunk_size)
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise TypeError(f"seco_backward: budget must be an int or None, got {budget!r}")
        if not 1 <= budget <= n_chunks:
            raise ValueError(
                f"seco_backward: budget must be in [1, number of chunks={n_chunks}] (seq_len={n}, "
                f"chunk_size={chunk_size}), got budget={budget}"
            )
    if cap is not None and not cap > 0:
        raise ValueError(f"seco_backward: cap must be positive or None, got cap={cap}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"seco_backward: attention_mask shape {tuple(attention_mask.shape)} does not match "
                f"input_ids shape {tuple(input_ids.shape)}"
            )
    return input_ids, labels, n, n_chunks


def _check_attention(model, n_chunks: int) -> None:
    """Refuses, before any compute, models and attention patches that cannot be chunked."""
    base = hf_model(_unwrap_ddp(model)[1], "seco_backward")
    if getattr(base, "_longtune_sp", None) is not None:
        raise ValueError(
            "seco_backward: the model runs sequence-parallel (longtune.distributed."
            "patch_sequence_parallel); chunk-wise training cannot be combined with sequence "
            "parallelism (a chunk would need the earlier chunks of every rank's shard). Train the "
            "shards with full backprop, or unpatch_sequence_parallel(model) for chunk-wise training"
        )
    stored = getattr(base.config, "longtune_patch", None) or {}
    if n_chunks > 1 and stored.get("attention") == "s2" and stored.get("mode") == "longlora_roll":
        raise ValueError(
            "seco_backward: the model is patched with S^2-Attn mode='longlora_roll', whose last "
            "shifted group wraps around to the end of the sequence; it cannot be trained "
            "chunk-wise. Use mode='leakfree' (longtune.patch(model, attention='s2', "
            "mode='leakfree')) or full backprop"
        )
    if stored.get("attention") == "lambda":
        raise ValueError(
            "seco_backward: the model is patched with the Lambda-mask (attention='lambda'), which "
            "is for inference only; train with attention='s2' or 'causal'"
        )
    if any(
        getattr(m, "gradient_checkpointing", False) is True for m in _unwrap_ddp(model)[1].modules()
    ):
        raise ValueError(
            "seco_backward: the model has activation (gradient) checkpointing enabled, under which "
            "transformers drops the cache that carries the earlier chunks' keys/values; disable it "
            "(model.activation_checkpointing_disable(), or gradient_checkpointing=False in the "
            "TrainingArguments): chunk-wise training already keeps one chunk's activations only"
        )


def seco_backward(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int,
    budget: Optional[int] = None,
    cap: Optional[float] = 2.0,
    attention_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    num_items_in_batch=None,
    full_loss: bool = True,
) -> torch.Tensor:
    """Chunk-wise backward of the causal-LM loss of ``model`` on ``input_ids`` / ``labels`` (B, N).

    Accumulates into ``.grad`` what ``model(input_ids, labels=labels).loss.backward()`` would
    (``budget=None``: SeCO, exact) or an estimate of it (``budget=K``: SpaCO, K of the
    ``ceil(N / chunk_size)`` chunks backpropagated, factors clipped at ``cap``; with
    ``cap=None`` unbiased up to the multi-hop terms described above; ``generator`` seeds the
    sampling). Returns the detached full-sequence loss (unscaled). ``num_items_in_batch``: divide
    the summed token losses by this instead of the number of target tokens (as transformers' Trainer
    does over accumulation steps). ``full_loss=False`` (SpaCO only): the chunks that are not sampled
    skip the vocabulary head in phase 1 (for small models the head is a large share of the forward),
    and the returned loss is the unbiased estimate ``N/K * sum of the sampled chunks' losses``
    instead of the exact full-sequence loss; the gradient is the same either way.
    With ``longtune.patch(model, lm_head="fused_ce")`` every chunk's loss comes from the hidden
    states through the fused linear + cross-entropy (no chunk x vocabulary logits).
    See the module docstring for the algorithm and scope."""
    input_ids, labels, n, n_chunks = _check(
        input_ids, labels, chunk_size, budget, cap, attention_mask
    )
    _check_attention(model, n_chunks)
    dev = input_ids.device
    labels = labels.to(dev)
    bsz = input_ids.shape[0]
    shift = torch.cat([labels[:, 1:], labels.new_full((bsz, 1), IGNORE_INDEX)], dim=1)
    n_targets = int((shift != IGNORE_INDEX).sum())
    if n_targets == 0:
        warnings.warn(
            "seco_backward: every label is ignored (-100); returning a zero loss, no gradient",
            stacklevel=2,
        )
        return torch.zeros((), device=dev)
    denom = n_targets if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(denom):
        denom = denom.to(dev)

    if budget is None:
        sampled, local_w, relay_w = list(range(n_chunks)), 1.0, 1.0
    else:
        sampled = spaco_sample(n_chunks, budget, generator)
        local_w, relay_w = spaco_factors(n_chunks, budget, cap)
    if not full_loss and budget is not None:
        skip_loss = set(range(n_chunks)) - set(sampled)
        scale = n_chunks / budget
    else:
        skip_loss, scale = set(), 1.0
    with sequence_length(n):  # S^2-Attn: the group size of the whole sequence in every chunk
        loss = _chunkwise_backward(
            model,
            input_ids,
            shift,
            chunk_size,
            sampled,
            local_w,
            relay_w,
            denom,
            skip_loss,
            None
            if attention_mask is None or bool((attention_mask != 0).all())
            else attention_mask.to(dev),
        )
    return loss * scale if scale != 1.0 else loss


def _chunkwise_backward(
    model,
    input_ids,
    shift,
    chunk_size,
    sampled,
    local_w,
    relay_w,
    denom,
    skip_loss=(),
    attention_mask=None,
):
    """Phases 1 and 2 for the chunks in ``sampled`` (indices), their local losses weighted by
    ``local_w`` and the k/v gradients relayed to them by ``relay_w`` (0: no relay); ``shift``: the
    globally shifted labels; ``denom``: the loss normaliser; ``attention_mask``: the (B, N) padding
    mask or None (chunk i sees its columns [0, e_i), as a cached forward does)."""
    dev = input_ids.device
    bsz, n = input_ids.shape
    n_chunks = math.ceil(n / chunk_size)
    bounds = [(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]
    sampled = sorted(set(int(i) for i in sampled))
    last_needed = max(
        sampled
    )  # the k/v of chunks from this one on are never attended to in phase 2

    ddp, inner = _unwrap_ddp(model)
    fsdp = _fsdp_modules(inner)
    n_layers = _num_layers(inner)
    params = _forward_params(inner)
    cache_kw = "cache" if "cache" in params or not params else "past_key_values"
    # longtune.patch(model, lm_head="fused_ce"): the chunk's loss straight from its hidden states
    fused_head = getattr(base_model(inner), "_longtune_orig_forward", None) is not None
    from transformers.cache_utils import Cache

    chunk_layer = _chunk_layer_class()

    def run(i, with_loss, grad=False):
        """(the chunk's loss (summed over its targets / denom) or None, its cache layers)."""
        s, e = bounds[i]
        # a phase-1 forward that only wants the k/v stops at the last layer's cache write; not
        # under FSDP2, whose forward hooks (reshard after forward, the per-forward state) must see
        # each module's forward complete
        kv_only = not with_loss and not grad
        stop = kv_only and not fsdp
        written = [0]
        layers = [
            chunk_layer(stores[layer], s, grad, written, n_layers if stop else 0)
            for layer in range(n_layers)
        ]
        cache = Cache(layers=layers)
        pos = torch.arange(s, e, device=dev).unsqueeze(0).expand(bsz, -1)
        kw = dict(
            input_ids=input_ids[:, s:e], position_ids=pos, use_cache=True, **{cache_kw: cache}
        )
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask[:, :e]
        if with_loss and fused_head:
            loss = model(**kw, shift_labels=shift[:, s:e], num_items_in_batch=denom).loss
        elif stop:
            # DDP's wrapper is bypassed here: its post-forward step would be skipped by the early
            # exit; without grad it has nothing to do for phase 1 (buffers sync in phase 2)
            try:
                inner(**kw)
            except _KVDone:
                pass
            loss = None
        elif kv_only:  # FSDP2: the whole forward runs, the head for one position only
            model(**kw, **({"logits_to_keep": 1} if "logits_to_keep" in params else {}))
            loss = None
        else:  # with_loss: phase 2, or a loss-only chunk of phase 1
            loss = chunk_loss(i, model(**kw).logits)
        if not grad:  # phase 1 collects every layer's k/v
            for layer, lay in enumerate(layers):
                if lay.new_k is None:
                    raise RuntimeError(
                        f"seco_backward: layer {layer} of {type(model).__name__} did not write its "
                        "keys/values through the cache interface (cache.update)"
                    )
        return loss, layers

    def chunk_loss(i, logits):
        s, e = bounds[i]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = (
                logits.float()
            )  # as transformers' ForCausalLMLoss; fp32 / fp64 stay as they are
        tgt = shift[:, s:e].reshape(-1)
        return (
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                tgt,
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            / denom
        )

    # ---------------------------------------------------------------- phase 1: forward, no grad
    # k/v of every layer in one buffer each; gradients for the chunks whose k/v gradient is relayed
    # (those before the last sampled chunk; none when nothing is relayed)
    relayed = {i for i in sampled if i < last_needed} if relay_w > 0 else set()
    stores = [_KVStore(n, bounds, relayed) for _ in range(n_layers)]
    rng = []
    total = torch.zeros((), device=dev, dtype=torch.float64)
    # phase 1 stops after the last chunk whose k/v (for a sampled chunk) or loss is still wanted:
    # SeCO's last chunk, or SpaCO's chunks after the last sampled one with full_loss=False, never
    # run here
    loss_chunks = [i for i in range(n_chunks) if i not in sampled and i not in skip_loss]
    phase1_end = max(last_needed, 1 + max(loss_chunks, default=-1))
    with torch.no_grad():
        for i in range(n_chunks):
            rng.append(_rng_state(dev))
            if i >= phase1_end:
                continue
            with_loss = i not in sampled and i not in skip_loss  # sampled chunks: loss in phase 2
            loss_i, layers = run(i, with_loss)  # writes its k/v into the layers' buffers
            if with_loss:
                total += loss_i.double()
            del loss_i, layers
    rng_end = _rng_state(dev)

    # ---------------------------------------------------------------- phase 2: reverse, with grad
    loss_dtype = torch.float32
    for i in reversed(sampled):
        cpu_state, cuda_state = rng[i]
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, dev)
        # DDP / FSDP2: accumulate locally, all-reduce (reduce-scatter) once, in the backward of
        # the last chunk processed
        if i == sampled[0]:
            sync = contextlib.nullcontext()
        elif ddp is not None:
            sync = ddp.no_sync()
        elif fsdp:
            sync = _fsdp_no_sync(fsdp)
        else:
            sync = contextlib.nullcontext()
        with sync:
            with torch.enable_grad():
                local, layers = run(i, True, grad=True)
            total += local.detach().double()
            loss_dtype = local.dtype
            outs, grads = [], []
            if local.requires_grad:
                outs.append(local)
                grads.append(torch.full_like(local, local_w))
            if i in relayed:  # relay the k/v gradient later chunks left for chunk i, then free it
                for lay, st in zip(layers, stores):
                    for new, gd in ((lay.new_k, st.gk), (lay.new_v, st.gv)):
                        g = gd.pop(i, None)
                        if g is not None and new.requires_grad:
                            outs.append(new)
                            grads.append(g.mul_(relay_w) if relay_w != 1.0 else g)
            if outs:
                torch.autograd.backward(outs, grads)
        del outs, grads, layers, local
    torch.set_rng_state(rng_end[0])
    if rng_end[1] is not None:
        torch.cuda.set_rng_state(rng_end[1], dev)
    return total.to(loss_dtype)


def seco_train_step(
    model,
    optimizer,
    input_ids,
    labels,
    *,
    chunk_size: int,
    budget: Optional[int] = None,
    cap: Optional[float] = 2.0,
    attention_mask=None,
    generator=None,
    max_grad_norm=None,
    full_loss: bool = True,
):
    """One optimizer step with chunk-wise backward: ``zero_grad``, :func:`seco_backward`, optional
    gradient clipping at ``max_grad_norm``, ``optimizer.step()``. Returns the (detached) loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = seco_backward(
        model,
        input_ids,
        labels,
        chunk_size=chunk_size,
        budget=budget,
        cap=cap,
        attention_mask=attention_mask,
        generator=generator,
        full_loss=full_loss,
    )
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], max_grad_norm
        )
    optimizer.step()
    return loss
