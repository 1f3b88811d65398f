"""Sequence parallelism for Hugging Face models patched with ``longtune.patch``: every rank runs
the model on its contiguous shard of each sequence (from :func:`~longtune.distributed.shard_batch`)
and the patched attention exchanges what it needs through
:func:`~longtune.distributed.s2_attention_sp`.

``patch_sequence_parallel(model, group)`` (or ``longtune.patch(model, attention="s2",
sequence_parallel=group)``) makes the patched model, on each rank of ``group``:

- compute attention over the GLOBAL sequence of N = W * L tokens: S^2-Attn (``attention="s2"`` in
  training) with the group size of N (``group_size_ratio * N``, or the fixed ``group_size``), full
  causal attention otherwise (``attention="causal"``, or ``"s2"`` in eval);
- use global rotary positions: ``position_ids`` from ``shard_batch`` or, when none are passed,
  ``r * L + arange(L)``;
- take its targets already shifted over the whole sequence (``shift_labels=batch.labels``: a label
  shifted inside the shard would lose the target of its last token, so plain ``labels`` alone are
  refused) and normalise the loss by the global number of targets (``num_items_in_batch``, counted
  over the group when not passed), with the fused head (``lm_head="fused_ce"``) or transformers'
  own loss;
- accept a padding mask whose padding is at the end of the whole sequence (exact: no real token
  attends to a later one); any other padding, and padding with ``mode="longlora_roll"`` (whose last
  shifted group wraps around to the start), is refused;
- refuse, before any compute, a forward whose attention the exchange ``mode`` cannot run (S^2-Attn
  runs in halo or Ulysses mode, full causal attention in Ulysses or ring mode), and chunk-wise
  training (``seco_backward``).

The full-sequence gradient of a parameter is the SUM of the ranks' gradients
(:func:`sum_gradients`; DDP / FSDP average, so scale the loss by the number of ranks they average
over)."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
import torch.distributed as dist

from .comm import as_timedelta, group_rank_size, resolve_group
from .sharding import IGNORE_INDEX, global_token_count

__all__ = ["patch_sequence_parallel", "unpatch_sequence_parallel", "sum_gradients"]

_ATTENTIONS = ("s2", "causal")


@dataclasses.dataclass
class SequenceParallelState:
    """What the patched attention of a sequence-parallel model needs (kept on the attention
    modules as ``_longtune_sp``; not saved with the model)."""

    group: Any
    mode: str
    timeout: Any
    hooks: list = dataclasses.field(default_factory=list)


def _where(caller):
    return f"longtune.distributed.{caller}"


def patch_sequence_parallel(model, group=None, *, mode: str = "auto", timeout=None):
    """Makes a model patched with ``longtune.patch(model, attention="s2" | "causal")`` run
    sequence-parallel over ``group`` (None: the default group; a ProcessGroup or a 1-D DeviceMesh):
    each rank passes its shard of every sequence (see the module docstring). ``mode``: the
    exchange :func:`~longtune.distributed.s2_attention_sp` uses (``"auto"``, ``"halo"``,
    ``"ulysses"``, ``"ring"``). In place; returns the model. Undo with
    :func:`unpatch_sequence_parallel`."""
    from ..integrations._common import attention_modules, hf_model
    from .attention import SP_MODES

    base = hf_model(model, _where("patch_sequence_parallel"))
    stored = getattr(base.config, "longtune_patch", None) or {}
    if stored.get("attention") not in _ATTENTIONS:
        raise ValueError(
            f"{_where('patch_sequence_parallel')}: patch the model first with "
            f"longtune.patch(model, attention='s2' or 'causal'); its stored attention is "
            f"{stored.get('attention')!r}"
        )
    if mode not in SP_MODES:
        raise ValueError(
            f"{_where('patch_sequence_parallel')}: mode must be one of {SP_MODES}, got {mode!r}"
        )
    if stored.get("attention") == "causal" and mode == "halo":
        raise ValueError(
            f"{_where('patch_sequence_parallel')}: mode='halo' exchanges the rows of S^2 groups; "
            "a model patched with attention='causal' runs full causal attention, in mode "
            "'ulysses', 'ring' or 'auto'"
        )
    group_rank_size(group, "patch_sequence_parallel")  # initialised, a valid group
    as_timedelta(timeout)
    decoder = getattr(base, "model", None)
    if not isinstance(decoder, torch.nn.Module) or getattr(base, "lm_head", None) is None:
        raise ValueError(
            f"{_where('patch_sequence_parallel')}: expected a *ForCausalLM model (with .model and "
            f".lm_head), got {type(base).__name__}"
        )
    unpatch_sequence_parallel(model)
    state = SequenceParallelState(resolve_group(group, "patch_sequence_parallel"), mode, timeout)
    for m in attention_modules(base):
        m._longtune_sp = state
    state.hooks = [
        base.register_forward_pre_hook(_loss_kwargs_hook(state), with_kwargs=True),
        decoder.register_forward_pre_hook(_decoder_hook(state, base), with_kwargs=True),
    ]
    base._longtune_sp = state
    return model


def unpatch_sequence_parallel(model):
    """Undoes :func:`patch_sequence_parallel` (the model runs on whole sequences again)."""
    from ..integrations._common import attention_modules, hf_model

    base = hf_model(model, _where("unpatch_sequence_parallel"))
    state = getattr(base, "_longtune_sp", None)
    if state is None:
        return model
    for h in state.hooks:
        h.remove()
    for m in attention_modules(base):
        if hasattr(m, "_longtune_sp"):
            del m._longtune_sp
    del base._longtune_sp
    return model


def _loss_kwargs_hook(state):
    def hook(module, args, kwargs):
        labels, shifted = kwargs.get("labels"), kwargs.get("shift_labels")
        if labels is not None and shifted is None:
            raise ValueError(
                "longtune sequence parallelism: pass shift_labels=batch.labels (the labels that "
                "longtune.distributed.shard_batch shifted over the whole sequence) instead of "
                "labels: shifting a shard's labels inside it would drop the target of its last "
                "token"
            )
        if shifted is None:
            return None
        kwargs = dict(kwargs)
        shifted = kwargs["shift_labels"] = shifted.contiguous()
        kwargs["labels"] = shifted  # transformers computes its loss only when labels are given
        if kwargs.get("num_items_in_batch") is None:
            kwargs["num_items_in_batch"] = global_token_count(shifted, state.group, IGNORE_INDEX)
        return args, kwargs

    return hook


def _decoder_hook(state, base):
    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        for name in ("cache", "past_key_values"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"longtune sequence parallelism: the model runs on sequence shards without a "
                    f"KV cache ({name} was given); unpatch_sequence_parallel for generation"
                )
        if kwargs.get("use_cache"):
            raise ValueError(
                "longtune sequence parallelism: use_cache=True is not supported (the model runs "
                "on sequence shards)"
            )
        kwargs["use_cache"] = False
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        if x is None:
            raise ValueError("longtune sequence parallelism: pass input_ids or inputs_embeds")
        _, rank, world = group_rank_size(state.group, "sequence parallelism")
        n_loc = x.shape[1]
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = (
                torch.arange(n_loc, device=x.device).add_(rank * n_loc).unsqueeze(0)
            )
        _check_exchange(base, state, n_loc, world)
        _check_padding(kwargs.get("attention_mask"), x.shape[0], n_loc, state, base, world)
        return args, kwargs

    return hook


def _s2_plan(module, n: int):
    """(s2_group_size or None, s2_mode) of an S^2-patched attention module's call on a global
    sequence of ``n`` tokens: S^2 groups in training (or with ``s2_in_eval``), full causal
    attention otherwise."""
    from ..integrations._common import patch_options
    from ..nn.attention import s2_mask

    o = patch_options(module, "s2")
    mask = s2_mask(
        training=module.training,
        s2_in_eval=o["s2_in_eval"],
        mode=o["mode"],
        group_size=o["group_size"],
        group_size_ratio=o["group_size_ratio"],
        seqlen=n,
    )
    if mask.s2_group_size:
        return mask.s2_group_size, mask.s2_mode
    return None, "leakfree"


def _check_exchange(base, state, n_loc: int, world: int):
    """Refuses, before any compute, a forward whose attention the chosen ``mode`` cannot run (e.g.
    ``mode="ring"`` with S^2-Attn in training, ``mode="halo"`` with full causal attention in
    eval, halo mode with groups longer than a shard)."""
    from ..integrations._common import attention_modules
    from .attention import sp_mode

    if world == 1:  # s2_attention_sp runs the kernel on the whole sequence
        return
    cfg = base.config
    s2 = (getattr(cfg, "longtune_patch", None) or {}).get("attention") == "s2"
    h_q = getattr(cfg, "sqa_query_heads", None) or getattr(cfg, "num_attention_heads", None)
    h_kv = getattr(cfg, "num_key_value_heads", None) or h_q
    heads = max(h_q, h_kv) if h_q else world  # unknown: the attention call checks the heads
    seen = set()
    for m in attention_modules(base):
        plan = _s2_plan(m, n_loc * world) if s2 else (None, "leakfree")
        if plan in seen:
            continue
        seen.add(plan)
        g, s2_mode = plan
        what = (
            "full causal attention"
            if g is None
            else f"S^2-Attn (group size {g}, s2_mode={s2_mode!r})"
        )
        try:
            chosen = sp_mode(n_loc * world, world, heads, g, s2_mode, state.mode)
        except ValueError as e:
            phase = "training" if m.training else "eval"
            raise ValueError(
                f"longtune sequence parallelism: this forward ({phase}, {n_loc * world} tokens "
                f"over {world} ranks) runs {what}, which patch_sequence_parallel(mode="
                f"{state.mode!r}) cannot run: {e}"
            ) from None
        if chosen == "ring" and h_q and h_q % h_kv:
            raise ValueError(
                f"longtune sequence parallelism: ring mode needs the number of query heads "
                f"({h_q}) to be a multiple of the key/value heads ({h_kv}); use mode='ulysses'"
            )


def _check_padding(mask, batch: int, n_loc: int, state, base, world: int):
    """Padding is exact only at the end of the whole sequence: one small all-gather of, per row,
    (this shard has padding, has real tokens, has a real token after a padding token)."""
    if mask is not None and tuple(mask.shape) != (batch, n_loc):
        raise ValueError(
            f"longtune sequence parallelism: attention_mask must be this rank's (batch, L) = "
            f"{(batch, n_loc)} shard of the 2-D padding mask, got {tuple(mask.shape)}"
        )
    flags = torch.zeros(batch, 3, dtype=torch.int64)
    if mask is not None:
        real = mask.detach().to("cpu", torch.bool)
        flags[:, 0] = (~real).any(1)
        flags[:, 1] = real.any(1)
        flags[:, 2] = (real[:, 1:] & ~real[:, :-1]).any(1)
    device = _comm_device(state.group)
    gathered = [torch.empty_like(flags, device=device) for _ in range(world)]
    dist.all_gather(gathered, flags.to(device), group=state.group)
    g = torch.stack([t.cpu() for t in gathered])  # (W, B, 3)
    padded = g[:, :, 0].bool()
    if not padded.any():
        return
    real_later = g[:, :, 1].flip(0).cummax(0).values.flip(0).bool()  # a real token at rank >= r
    later_real = torch.zeros_like(real_later)
    later_real[:-1] = real_later[1:]
    if g[:, :, 2].any() or (padded & later_real).any():
        raise ValueError(
            "longtune sequence parallelism: attention_mask has padding before real tokens; only "
            "padding at the end of the whole sequence is supported (pad on the right, labels "
            f"{IGNORE_INDEX} on the padding)"
        )
    from ..integrations._common import attention_modules, patch_options

    if any(patch_options(m, "s2").get("mode") == "longlora_roll" for m in attention_modules(base)):
        stored = getattr(base.config, "longtune_patch", None) or {}
        if stored.get("attention") == "s2":
            raise ValueError(
                "longtune sequence parallelism: padding with mode='longlora_roll' is not "
                "supported (its last shifted group wraps around to the start of the sequence "
                "and would read the padding); use mode='leakfree' or unpadded sequences"
            )


def _comm_device(group):
    backend = dist.get_backend(group)
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def attention(module, query, key, value, scaling, kwargs, *, s2: bool, chunked: bool = False):
    """The attention call of a sequence-parallel model (from the patched attention function):
    query / key / value (B, H, L, D) of this rank's tokens; returns (B, L, H, D). ``chunked``: the
    call is inside chunk-wise training (refused)."""
    from .attention import s2_attention_sp

    state = module._longtune_sp
    _, _, world = group_rank_size(state.group, "sequence parallelism")
    nq, nk = query.shape[2], key.shape[2]
    if nq != nk:
        raise ValueError(
            f"longtune sequence parallelism: {nq} queries attend to {nk} keys (a KV cache); the "
            f"model runs on whole sequence shards only"
        )
    if kwargs.get("cu_seq_lens_q") is not None:
        raise ValueError(
            "longtune sequence parallelism: packed sequences (cu_seq_lens) are not supported; "
            "pass (batch, L) shards from shard_batch"
        )
    if kwargs.get("softcap"):
        raise ValueError(
            "longtune sequence parallelism: attention logit softcapping is not supported"
        )
    n = nq * world
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window is not None and int(window) < n - 1:
        raise ValueError(
            f"longtune sequence parallelism: a sliding window ({window}) shorter than the "
            f"sequence ({n}) is not supported"
        )
    if chunked:
        raise ValueError(
            "longtune sequence parallelism cannot be combined with chunk-wise training "
            "(longtune.integrations.hf.sequence_length)"
        )
    group_size, s2_mode = _s2_plan(module, n) if s2 else (None, "leakfree")
    return s2_attention_sp(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        s2_group_size=group_size,
        s2_mode=s2_mode,
        mode=state.mode,
        softmax_scale=scaling,
        group=state.group,
        timeout=state.timeout,
    )


@torch.no_grad()
def sum_gradients(parameters: Iterable[torch.Tensor], group=None) -> None:
    """All-reduces (sums) the ``.grad`` of ``parameters`` over ``group``: the gradient of the whole
    sequence from the ranks' gradients of their shards (every rank must call it with the same
    parameters; those without a gradient are skipped on every rank alike)."""
    group, _, _ = group_rank_size(group, "sum_gradients")
    for p in parameters:
        if isinstance(p, torch.Tensor) and p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
