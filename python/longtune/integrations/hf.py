"""Hugging Face transformers integration: longtune attention through transformers'
attention-function registry (``AttentionInterface``), no copied model code.

- ``attn_implementation="longtune"``: causal attention through ``longtune.sparse_attention``
  (sliding windows of Mistral / Qwen2 configs honoured, padding masks from the tokenizer as a key
  padding mask, GQA without repeating k/v).
- ``attn_implementation="longtune_s2"``: LongLoRA's contract -- shifted sparse attention (S^2-Attn)
  in ``model.train()``, full causal attention in ``model.eval()`` (unless ``s2_in_eval``).
- ``attn_implementation="longtune_lambda"``: LM-Infinite -- Lambda-mask (n_global first tokens +
  a window) with the rotary distance cap, for generation beyond the trained length
  (see :mod:`longtune.integrations.lm_infinite`).

``patch(model, attention=..., **options)`` sets the implementation, stores the options on the
attention modules and in ``model.config.longtune_patch`` (saved by ``save_pretrained``), so that
after ``from_pretrained`` one ``patch(model)`` re-applies the same patch.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch
from torch import nn

from ..nn.attention import check_s2_options, s2_mask
from ..ops.attention import sparse_attention
from ..ops.mask import AttentionMask
from ._common import PATCH_DEFAULTS as _DEFAULTS
from ._common import ROSTE_PREFIX as _ROSTE_PREFIX
from ._common import attention_modules as _attention_modules
from ._common import hf_model
from ._common import padding_mask as _padding_mask
from ._common import patch_options as _options
from .lm_infinite import lambda_attention_forward

SUPPORTED_MODEL_TYPES = (
    "llama",
    "qwen2",
    "mistral",
    "qwen3",
    "phi3",
    "mixtral",
    "qwen3_moe",
    "olmo2",
    "gemma2",
    "gemma3_text",
)
IMPLEMENTATIONS = {"causal": "longtune", "s2": "longtune_s2", "lambda": "longtune_lambda"}


def _to_bnhd(t):
    return t.transpose(1, 2)  # (B, H, N, D) -> (B, N, H, D), a view


def _check_dropout(module, dropout):
    if dropout and module.training:
        raise ValueError(
            f"longtune attention has no attention dropout; set the config's attention_dropout to 0 "
            f"(got {dropout})"
        )


def _packed(kwargs):
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    return (cu_q, cu_k) if cu_q is not None else (None, None)


def _run(
    module, query, key, value, attention_mask, scaling, kwargs, mask: Optional[AttentionMask] = None
):
    mask = AttentionMask() if mask is None else mask
    cap = kwargs.get("softcap")  # attention logit softcapping (Gemma-2's attn_logit_softcapping)
    softcap = float(cap) if cap else None
    q, k, v = _to_bnhd(query), _to_bnhd(key), _to_bnhd(value)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window is not None and mask.window is None:
        mask = mask.replace(window_left=int(window))
    cu_q, cu_k = _packed(kwargs)
    if cu_q is not None:  # padding-free packing (DataCollatorWithFlattening): (1, T, H, D)
        out = sparse_attention(
            q[0],
            k[0],
            v[0],
            softmax_scale=scaling,
            cu_seqlens=cu_q,
            cu_seqlens_k=cu_k,
            mask=mask,
            softcap=softcap,
        )
        return out.unsqueeze(0)
    kpm = _padding_mask(attention_mask, k.shape[1])
    return sparse_attention(
        q, k, v, softmax_scale=scaling, key_padding_mask=kpm, mask=mask, softcap=softcap
    )


def longtune_attention_forward(
    module: nn.Module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
):
    """``attn_implementation="longtune"``: causal flash attention."""
    _check_dropout(module, dropout)
    if getattr(module, "_longtune_sp", None) is not None:  # longtune.distributed sequence shards
        from ..distributed.hf import attention

        chunked = _SEQUENCE_LENGTH.get() is not None
        out = attention(module, query, key, value, scaling, kwargs, s2=False, chunked=chunked)
        return out, None
    return _run(module, query, key, value, attention_mask, scaling, kwargs), None


_SEQUENCE_LENGTH: contextvars.ContextVar = contextvars.ContextVar(
    "longtune_sequence_length", default=None
)


@contextlib.contextmanager
def sequence_length(n: int):
    """Declares that the forwards run inside this block see chunks of one sequence of ``n`` tokens
    (chunk-wise training: a query chunk attends to the keys of all earlier chunks). S^2-Attn then
    takes its group size from ``n`` -- the mask full backprop over the whole sequence would use --
    instead of from the chunk's length."""
    token = _SEQUENCE_LENGTH.set(int(n))
    try:
        yield
    finally:
        _SEQUENCE_LENGTH.reset(token)


def _s2_mask(module, o, nq, nk, kwargs) -> AttentionMask:
    """The mask of one attention call (S^2-Attn while training, plain causal attention
    otherwise)."""
    if nq <= 1:  # one query (decoding)
        return AttentionMask()

    def rule(mode, seqlen):  # LongLoRA's train / eval rule, shared with S2Attention
        return s2_mask(
            training=module.training,
            s2_in_eval=o["s2_in_eval"],
            mode=mode,
            group_size=o["group_size"],
            group_size_ratio=o["group_size_ratio"],
            seqlen=seqlen,
        )

    if not (module.training or o["s2_in_eval"]):
        return rule(o["mode"], nq)
    total = _SEQUENCE_LENGTH.get()
    if total is None:
        if nq == nk:

            def longest():
                cu_q, _ = _packed(kwargs)
                if cu_q is None:
                    return nq
                n = kwargs.get("max_length_q")  # packed: the longest sequence's length
                if n is None:
                    n = (cu_q[1:] - cu_q[:-1]).max()
                if torch.is_tensor(n) and torch.compiler.is_compiling():
                    raise ValueError(
                        "longtune S^2-Attn on packed sequences under torch.compile needs the "
                        "longest sequence's length as a Python int (max_length_q) or a fixed "
                        "group_size: a group size cannot come from tensor data inside a graph"
                    )
                return int(n)

            return rule(o["mode"], longest)
        if o["group_size"] and o["mode"] == "leakfree":
            # a query chunk against a longer KV: groups are absolute positions and the queries are
            # the last nq of them (bottom-right), so a fixed group size gives exactly the rows of
            # the full sequence's S^2-Attn
            return rule("leakfree", nq)
        raise ValueError(
            f"longtune S^2-Attn in training: {nq} queries attend to {nk} keys (a KV cache), and "
            "the group size of the whole sequence is unknown here. Patch with a fixed group size "
            "(longtune.patch(model, attention='s2', group_size=G), mode='leakfree'), train "
            "chunk-wise through longtune.train.seco_backward (which passes the sequence length), "
            "or run the model in eval() for generation"
        )
    # one chunk of a sequence of `total` tokens (chunk-wise training)
    if nq == nk == total:
        return rule(o["mode"], total)
    if o["mode"] != "leakfree":
        raise ValueError(
            "longtune S^2-Attn: mode='longlora_roll' cannot be trained chunk-wise (its last "
            "shifted group wraps around to the end of the sequence, which a chunk has not seen "
            "yet); use mode='leakfree' or full backprop"
        )
    if nk > total:
        raise ValueError(
            f"longtune S^2-Attn: {nk} keys exceed the declared sequence length {total}"
        )
    return rule("leakfree", total)


def longtune_s2_attention_forward(
    module: nn.Module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
):
    """``attn_implementation="longtune_s2"``: S^2-Attn in training, causal in eval (LongLoRA)."""
    _check_dropout(module, dropout)
    if getattr(module, "_longtune_sp", None) is not None:  # longtune.distributed sequence shards
        from ..distributed.hf import attention

        chunked = _SEQUENCE_LENGTH.get() is not None
        out = attention(module, query, key, value, scaling, kwargs, s2=True, chunked=chunked)
        return out, None
    mask = _s2_mask(module, _options(module, "s2"), query.shape[2], key.shape[2], kwargs)
    return _run(module, query, key, value, attention_mask, scaling, kwargs, mask=mask), None


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    for name, fn in (
        ("longtune", longtune_attention_forward),
        ("longtune_s2", longtune_s2_attention_forward),
        ("longtune_lambda", lambda_attention_forward),
    ):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, flash_attention_mask)  # 2-D padding mask or None


_registered = False


def register() -> None:
    """Registers the longtune attention implementations with transformers (idempotent; ``patch`` and
    ``import longtune.integrations.hf`` call it)."""
    global _registered
    if not _registered:
        _register()
        _registered = True


def _current_implementation(base) -> str:
    """The model's attention implementation, seen through a RoSTE wrapper (which stays in place)."""
    impl = getattr(base.config, "_attn_implementation", None) or "sdpa"
    return impl[len(_ROSTE_PREFIX) :] if impl.startswith(_ROSTE_PREFIX) else impl


def _set_implementation(base, impl: str) -> None:
    """Sets the attention implementation; on a RoSTE-prepared model, under its wrapper (online
    rotation and K/V fake-quantization, then ``impl``), so that neither silently drops the other."""
    current = getattr(base.config, "_attn_implementation", None) or ""
    if current.startswith(_ROSTE_PREFIX):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        from .quant import roste_attention

        name = _ROSTE_PREFIX + impl
        AttentionInterface.register(name, roste_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
        for m in _attention_modules(base):
            m.longtune_roste["base"] = impl
        impl = name
    base.set_attn_implementation(impl)


class _GradAt(torch.autograd.Function):
    """The vocabulary head's effective weight as a tensor whose gradient reaches the trainable
    parameter it is built from: forward returns ``weight`` (which already holds the trained
    entries), backward hands ``extract(dW)`` to ``trainable``."""

    @staticmethod
    def forward(ctx, trainable, weight, extract):
        ctx.extract = extract
        return weight.detach()

    @staticmethod
    def backward(ctx, g):
        return ctx.extract(g), None, None


def _head_params(head):
    """(weight, bias) of the vocabulary head for the fused loss, differentiable towards whatever the
    head trains; a clear error for heads whose output is not ``x @ weight.T + bias``."""
    from ..nn.quant import RotatedQuantLinear
    from ..nn.s2ft import S2FTLinear
    from ..nn.sparse_delta import SparseDeltaLinear

    if isinstance(head, SparseDeltaLinear):
        idx = head.indices

        def extract(g):
            collect = getattr(head, "_collect", None)
            if collect is not None:  # SpIEL growth statistics from the whole dW
                collect.dense(g)
            return g.reshape(-1)[idx]

        return _GradAt.apply(head.values, head.merged_weight(), extract), head.base.bias
    if isinstance(head, S2FTLinear):
        lo, hi, dim = head.lo, head.hi, head.dim
        cut = (lambda g: g[lo:hi]) if dim == "out" else (lambda g: g[:, lo:hi])
        return _GradAt.apply(head.part, head.base.weight, cut), head.base.bias
    if isinstance(head, RotatedQuantLinear) or not isinstance(head, nn.Linear):
        if hasattr(head, "base_layer") and hasattr(head, "lora_A"):
            return _lora_head_params(head)
        raise ValueError(
            f"longtune.patch(lm_head='fused_ce'): the vocabulary head is a {type(head).__name__}, "
            "whose output is not x @ weight.T + bias; the fused loss supports nn.Linear, "
            "SparseDeltaLinear, S2FTLinear and peft LoRA heads (without dropout or DoRA)"
        )
    return head.weight, head.bias


def _lora_head_params(head):
    """A peft LoRA ``Linear`` head: W + sum of scaling * B @ A over the active adapters."""
    base = head.base_layer
    if (
        type(base) is not nn.Linear
        or getattr(head, "fan_in_fan_out", False)
        or getattr(head, "merged", False)
    ):
        raise ValueError(
            f"longtune.patch(lm_head='fused_ce'): unsupported peft head over {type(base).__name__} "
            "(fan_in_fan_out or merged adapters); merge_and_unload() it or drop lm_head from the "
            "LoRA targets"
        )
    w = base.weight
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        drop = head.lora_dropout[name]
        if head.training and not isinstance(drop, nn.Identity) and getattr(drop, "p", 0.0) > 0:
            raise ValueError(
                "longtune.patch(lm_head='fused_ce'): LoRA dropout on the vocabulary head is not "
                "supported by the fused loss (it is not a weight-space update); set lora_dropout=0 "
                "or leave lm_head out of the LoRA targets"
            )
        if getattr(head, "use_dora", {}).get(name, False):
            raise ValueError(
                "longtune.patch(lm_head='fused_ce'): DoRA on the vocabulary head is not supported"
            )
        a, b = head.lora_A[name].weight, head.lora_B[name].weight
        w = w + (b @ a).to(w.dtype) * head.scaling[name]
    return w, base.bias


def _fused_ce_forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
    """CausalLM forward with the vocabulary head fused into the loss (``patch(model,
    lm_head="fused_ce")``): with ``labels`` the logits are never materialised (``output.logits`` is
    None); without labels, the model's own forward (generation, evaluation of logits).
    ``shift_labels`` (as in transformers' loss functions: targets already aligned with the
    positions, no shift inside; used by chunk-wise training, whose chunks take their last target
    from the next chunk) may be given instead of ``labels``."""
    shift_labels = kwargs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        return self._longtune_orig_forward(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        )
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ..nn.cross_entropy import causal_lm_loss

    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    h = out.last_hidden_state
    tgt = (labels if shift_labels is None else shift_labels).to(h.device)
    weight, bias = _head_params(self.lm_head)
    cap = getattr(self.config, "final_logit_softcapping", None)
    loss = causal_lm_loss(
        h,
        weight,
        tgt,
        bias,
        shift=shift_labels is None,
        ignore_index=-100,
        reduction="sum" if num_items is not None else "mean",
        softcap=cap,
    )
    if num_items is not None:
        loss = loss / num_items
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=out.past_key_values,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
    )


def _patch_lm_head(base):
    import types

    if not hasattr(base, "lm_head") or not hasattr(base, "model"):
        raise ValueError(
            "longtune.patch(lm_head='fused_ce'): the model has no lm_head / model (a *ForCausalLM)"
        )
    with torch.no_grad():
        _head_params(
            base.lm_head
        )  # a head the fused loss cannot represent is refused here, before any compute
    if getattr(base, "_longtune_orig_forward", None) is None:
        base._longtune_orig_forward = base.forward
        base.forward = types.MethodType(_fused_ce_forward, base)


def _unpatch_lm_head(base):
    orig = getattr(base, "_longtune_orig_forward", None)
    if orig is not None:
        base.forward = orig
        del base._longtune_orig_forward


def patch(
    model,
    *,
    attention: Optional[str] = None,
    strict: bool = True,
    lm_head: Optional[str] = None,
    sequence_parallel=None,
    **options,
):
    """Routes a transformers causal LM's attention through longtune (in place; returns the model).

    ``attention="s2"`` (LongLoRA: S^2-Attn while training; options ``group_size_ratio=0.25``,
    ``mode="leakfree"|"longlora_roll"``, ``s2_in_eval=False``, ``group_size=None``), ``"causal"``,
    or ``"lambda"`` (LM-Infinite: ``window=2048``, ``n_global=4``, ``cap_distance=True``; use
    :func:`longtune.integrations.lm_infinite.lambda_cache` for an O(window) KV cache).
    ``lm_head="fused_ce"``: with ``labels`` the forward computes the loss with
    ``longtune.linear_cross_entropy`` from the hidden states (logits never materialised,
    ``output.logits`` is None); without labels the model's own forward runs.
    With no arguments, re-applies the patch stored in ``model.config.longtune_patch`` (after
    ``from_pretrained``). Supported: Llama, Qwen2, Mistral, Qwen3, Phi-3, Mixtral, Qwen3-MoE,
    OLMo-2, Gemma-2 (attention logit softcapping in the kernels) and Gemma-3 (``strict=False`` tries
    any model whose attention uses transformers' attention-function registry). Works on peft-wrapped
    models.
    ``sequence_parallel``: a process group (a ``ProcessGroup``, a 1-D ``DeviceMesh``, or ``True``
    for the default group) over which every sequence is sharded (``attention="s2"`` or
    ``"causal"``): :func:`longtune.distributed.patch_sequence_parallel`; not stored with the
    model."""
    if sequence_parallel is not None and sequence_parallel is not False:
        from ..distributed.hf import patch_sequence_parallel

        patch(model, attention=attention, strict=strict, lm_head=lm_head, **options)
        group = None if sequence_parallel is True else sequence_parallel
        return patch_sequence_parallel(model, group)
    base = hf_model(model, "longtune.patch")
    register()
    cfg = base.config
    stored = dict(getattr(cfg, "longtune_patch", None) or {})
    if lm_head is not None or (attention is None and stored.get("lm_head")):
        lm_head = lm_head or stored.get("lm_head")
        if lm_head != "fused_ce":
            raise ValueError(
                f"longtune.patch: lm_head must be 'fused_ce' (or None), got {lm_head!r}"
            )
        _patch_lm_head(base)
        stored["lm_head"] = lm_head
        cfg.longtune_patch = stored
        if attention is None and "attention" not in stored:
            return model
    if attention is None:
        if not stored:
            raise ValueError(
                "longtune.patch: pass attention='s2' | 'causal' | 'lambda' (the model carries no "
                "stored longtune patch to re-apply)"
            )
        attention = stored["attention"]
        options = {
            **{k: v for k, v in stored.items() if k in _DEFAULTS.get(attention, {})},
            **options,
        }
    if attention not in IMPLEMENTATIONS:
        raise ValueError(
            f"longtune.patch: attention must be one of {sorted(IMPLEMENTATIONS)}, got {attention!r}"
        )
    if attention == "lambda" and getattr(base, "_longtune_sp", None) is not None:
        raise ValueError(
            "longtune.patch: attention='lambda' on a sequence-parallel model is refused (the "
            "Lambda-mask has no sequence-parallel form); unpatch_sequence_parallel(model) first"
        )
    unknown = set(options) - set(_DEFAULTS[attention])
    if unknown:
        raise ValueError(
            f"longtune.patch: unknown option(s) {sorted(unknown)} for attention={attention!r}; "
            f"valid: {sorted(_DEFAULTS[attention])}"
        )
    if strict and getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"longtune.patch: model_type {getattr(cfg, 'model_type', None)!r} is not one of the "
            f"tested families {SUPPORTED_MODEL_TYPES}; pass strict=False to try anyway"
        )
    opts = dict(_DEFAULTS[attention], **options)
    if attention == "s2":
        check_s2_options(
            "longtune.patch", opts["group_size_ratio"], opts["mode"], opts["group_size"]
        )
    if attention == "lambda":
        if opts["window"] < 1 or opts["n_global"] < 0:
            raise ValueError(
                f"longtune.patch: window must be >= 1 and n_global >= 0, got {opts['window']}, "
                f"{opts['n_global']}"
            )
    previous = stored.get("previous", _current_implementation(base))
    if previous in IMPLEMENTATIONS.values():
        previous = "sdpa"
    mods = list(_attention_modules(base))
    if not mods:
        raise ValueError(
            "longtune.patch: found no attention modules (with q_proj or qkv_proj, o_proj and "
            "layer_idx) in the model"
        )
    _set_implementation(base, IMPLEMENTATIONS[attention])
    for m in mods:
        m._longtune_options = dict(opts)
    cfg.longtune_patch = {
        "attention": attention,
        **opts,
        "previous": previous,
        **({"lm_head": stored["lm_head"]} if stored.get("lm_head") else {}),
    }
    return model


def unpatch(model):
    """Undoes :func:`patch`: the attention implementation the model had before, no stored patch."""
    base = hf_model(model, "longtune.unpatch")
    stored = getattr(base.config, "longtune_patch", None)
    if not stored:
        return model
    if getattr(base, "_longtune_sp", None) is not None:
        from ..distributed.hf import unpatch_sequence_parallel

        unpatch_sequence_parallel(base)
    _unpatch_lm_head(base)
    if "attention" in stored:
        _set_implementation(base, stored.get("previous") or "sdpa")
    for m in _attention_modules(base):
        if hasattr(m, "_longtune_options"):
            del m._longtune_options
    del base.config.longtune_patch
    return model


# ------------------------------------------------------------------ SQA conversion
@torch.no_grad()
def convert_to_sqa(
    model,
    num_query_heads: Optional[int] = None,
    *,
    variant: Optional[str] = None,
    num_kv_heads: Optional[int] = None,
    rule: str = "select",
):
    """Converts a Llama / Qwen2 / Mistral model's attention blocks to Sparse Query Attention in
    place:
    H_q < H query heads (fewer score FLOPs), initialised from the original weights, attention
    through longtune (which maps query heads to key/value heads, including H_kv > H_q).

    ``variant`` ("sqa", "ssqa", "xsqa", "xsmqa", "rsqa", relative to the model's H heads) or
    explicit ``num_query_heads`` / ``num_kv_heads`` (default: keep H_kv unless the variant says).
    Rule for each new head (heads are taken in order inside each key/value group, so the query ->
    key/value sharing stays the model's):
    ``"select"``: keep the first heads of each group (their q_proj rows and o_proj columns);
    ``"average"``: split the group's heads into equal consecutive runs; the new q_proj rows are the
    run's mean and the new o_proj columns its sum (exact when the run's heads attend alike).
    Key/value heads are reduced the same way (k/v rows averaged or selected per run).
    Returns the model; ``model.config`` records the new head counts."""
    from ..nn.attention import SparseQueryAttention

    if rule not in ("select", "average"):
        raise ValueError(f"convert_to_sqa: rule must be 'select' or 'average', got {rule!r}")
    base = hf_model(model, "longtune.convert_to_sqa")
    cfg = base.config
    h, hkv0 = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    if variant is not None:
        hq, hkv = SparseQueryAttention.variant_heads(variant, h, num_query_heads)
        hkv = min(hkv, hkv0) if variant not in ("rsqa",) else hkv
    else:
        if num_query_heads is None:
            raise ValueError("convert_to_sqa: pass num_query_heads or variant")
        hq, hkv = num_query_heads, (num_kv_heads or hkv0)
    if hq > h:
        raise ValueError(f"convert_to_sqa: num_query_heads={hq} exceeds the model's {h} heads")
    if hkv > hkv0:
        raise ValueError(f"convert_to_sqa: the model has {hkv0} key/value heads; cannot make {hkv}")
    if hkv0 % hkv or h % hq or (hq % hkv and hkv % hq):
        raise ValueError(
            f"convert_to_sqa: H={h}, H_kv={hkv0} -> H_q={hq}, H_kv={hkv} needs H % H_q == 0, "
            f"H_kv % new H_kv == 0 and H_q, H_kv dividing one another"
        )

    def reduce_rows(w, n_old, n_new, d, groups, how):
        """w (n_old * d, ...) -> (n_new * d, ...): inside each of `groups` groups, n_old/groups
        heads become n_new/groups heads by runs."""
        per_old, per_new = n_old // groups, max(1, n_new // groups)
        w = w.view(groups, per_old, d, *w.shape[1:])
        if how == "select":
            r = w[:, :per_new]
        else:
            run = per_old // per_new
            r = w.view(groups, per_new, run, d, *w.shape[3:]).mean(2)
        return r.reshape(groups * per_new * d, *w.shape[3:])

    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    if any(not hasattr(m, "q_proj") for m in _attention_modules(base)):
        raise ValueError(
            "convert_to_sqa: the attention blocks have a fused qkv_proj (Phi-3); separate q_proj / "
            "k_proj / v_proj projections are needed"
        )
    for m in _attention_modules(base):
        dev, dt = m.q_proj.weight.device, m.q_proj.weight.dtype
        # queries: stay inside their kv group (groups = min(hkv0, hq) keeps the sharing for hq >=
        # hkv)
        gq = min(hkv0, hq) if hq >= hkv else hq
        newq = reduce_rows(m.q_proj.weight, h, hq, d, gq, rule)
        qb = (
            reduce_rows(m.q_proj.bias.view(-1, 1), h, hq, d, gq, rule).view(-1)
            if m.q_proj.bias is not None
            else None
        )
        # o_proj columns: select, or sum over the run
        wo = m.o_proj.weight.T.contiguous()  # (h*d, hidden)
        newo = reduce_rows(wo, h, hq, d, gq, rule)
        if rule == "average":
            newo = newo * (h // hq)
        nk = (
            reduce_rows(m.k_proj.weight, hkv0, hkv, d, hkv, rule)
            if hkv != hkv0
            else m.k_proj.weight
        )
        nv = (
            reduce_rows(m.v_proj.weight, hkv0, hkv, d, hkv, rule)
            if hkv != hkv0
            else m.v_proj.weight
        )
        kb = m.k_proj.bias
        vb = m.v_proj.bias
        if hkv != hkv0 and kb is not None:
            kb = reduce_rows(kb.view(-1, 1), hkv0, hkv, d, hkv, rule).view(-1)
            vb = reduce_rows(vb.view(-1, 1), hkv0, hkv, d, hkv, rule).view(-1)
        out_heads = max(hq, hkv)
        if hkv > hq:  # rSQA: the output has H_kv heads; tile the o columns of the query heads
            newo = newo.view(hq, d, -1).repeat(hkv // hq, 1, 1).reshape(hkv * d, -1) * (hq / hkv)

        def lin(w, b):
            layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=dev, dtype=dt)  # noqa: B023 (called in this iteration)
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)
            return layer

        m.q_proj = lin(newq, qb)
        m.k_proj = lin(nk, kb)
        m.v_proj = lin(nv, vb)
        m.o_proj = lin(newo.T.contiguous(), m.o_proj.bias)
        m.num_key_value_groups = max(1, hq // hkv)
        assert m.o_proj.in_features == out_heads * d
    cfg.num_attention_heads_before_sqa = h
    cfg.sqa_query_heads, cfg.num_key_value_heads = hq, hkv
    cfg.head_dim = d
    patch(model, attention=(getattr(cfg, "longtune_patch", None) or {}).get("attention", "causal"))
    return model
