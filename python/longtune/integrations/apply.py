"""``longtune.apply(model, *configs)``: validates a combination of the typed configs of
:mod:`longtune.config` up front, applies them through the family functions and records them in
``model.config`` (see :mod:`longtune.config`); :func:`chunkwise_backward` runs the recorded
:class:`~longtune.config.ChunkwiseConfig`.

transformers / peft are imported when a config is applied, not when this module is imported."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Optional

from ..config import (
    _BY_NAME,
    _ORDER,
    _TRAINABLE,
    CONFIG_TYPES,
    RECORD_KEY,
    AttentionConfig,
    ChunkwiseConfig,
    FusedCrossEntropyConfig,
    LongLoRAConfig,
    RoSTEConfig,
    S2FTConfig,
    SparseDeltaConfig,
    _to_record,
    applied,
    get_config,
)

__all__ = ["apply", "chunkwise_backward"]


# ------------------------------------------------------------------ validation
def _validate(model, base, configs: dict) -> None:
    """Refuses, before the model is touched, combinations longtune cannot compute exactly."""
    from . import hf

    att = configs.get(AttentionConfig)
    chunk = configs.get(ChunkwiseConfig)
    trainable = [c.__name__ for c in _TRAINABLE if c in configs]
    if len(trainable) > 1:
        raise ValueError(
            f"longtune.apply: {' and '.join(trainable)} both choose the trainable parameters; "
            "apply one of them"
        )
    if RoSTEConfig in configs and (SparseDeltaConfig in configs or S2FTConfig in configs):
        other = "SparseDeltaConfig" if SparseDeltaConfig in configs else "S2FTConfig"
        raise ValueError(
            f"longtune.apply: RoSTEConfig with {other} is not supported (the quantized "
            "RotatedQuantLinear projections cannot carry sparse deltas or an S2FT selection); "
            "combine RoSTE with LongLoRAConfig or train the quantized model in full"
        )
    stored = dict(getattr(base.config, "longtune_patch", None) or {})
    kind = att.kind if att is not None else stored.get("attention")
    mode = att.s2_mode if att is not None else stored.get("mode")
    if kind == "lambda":
        training = [c.__name__ for c in (ChunkwiseConfig, *_TRAINABLE) if c in configs]
        if training:
            raise ValueError(
                "longtune.apply: AttentionConfig(kind='lambda') is for inference only (LM-Infinite "
                "generation beyond the trained length) and cannot be combined with "
                f"{', '.join(training)}; train with kind='s2' or 'causal'"
            )
    if chunk is not None and kind == "s2" and mode == "longlora_roll":
        raise ValueError(
            "longtune.apply: ChunkwiseConfig with AttentionConfig(s2_mode='longlora_roll') is "
            "refused: its last shifted group wraps around to the end of the sequence, which a "
            "chunk has not seen yet; use s2_mode='leakfree' or train without ChunkwiseConfig"
        )
    if getattr(base, "_longtune_sp", None) is not None:
        if chunk is not None:
            raise ValueError(
                "longtune.apply: ChunkwiseConfig on a sequence-parallel model "
                "(longtune.distributed.patch_sequence_parallel) is refused: chunk-wise training "
                "cannot be combined with sequence parallelism; train the shards with full backprop"
            )
        if kind == "lambda":
            raise ValueError(
                "longtune.apply: AttentionConfig(kind='lambda') on a sequence-parallel model is "
                "refused (the Lambda-mask has no sequence-parallel form); "
                "unpatch_sequence_parallel(model) first"
            )
    if (
        att is not None
        and att.strict
        and getattr(base.config, "model_type", None) not in hf.SUPPORTED_MODEL_TYPES
    ):
        raise ValueError(
            "longtune.apply: AttentionConfig: model_type "
            f"{getattr(base.config, 'model_type', None)!r} is not one of the tested families "
            f"{hf.SUPPORTED_MODEL_TYPES}; pass AttentionConfig(strict=False) to try anyway"
        )
    if att is not None and not list(hf._attention_modules(base)):
        raise ValueError(
            "longtune.apply: AttentionConfig: the model has no attention modules with q_proj (or "
            "qkv_proj), o_proj and layer_idx"
        )
    if FusedCrossEntropyConfig in configs:
        if not hasattr(base, "lm_head") or not hasattr(base, "model"):
            raise ValueError(
                "longtune.apply: FusedCrossEntropyConfig needs a *ForCausalLM with lm_head and "
                "model"
            )
        lora = configs.get(LongLoRAConfig)
        if (
            lora is not None
            and "lm_head" in lora.target_modules
            and (lora.lora_dropout > 0 or lora.use_dora)
        ):
            what = "LoRA dropout" if lora.lora_dropout > 0 else "DoRA"
            raise ValueError(
                "longtune.apply: FusedCrossEntropyConfig with LongLoRAConfig targeting lm_head "
                f"with {what} is refused: the fused loss needs the head to be a weight-space "
                "update (set lora_dropout=0 / use_dora=False, or leave lm_head out of "
                "target_modules)"
            )
        import torch

        try:
            with torch.no_grad():
                hf._head_params(base.lm_head)
        except ValueError as e:
            raise ValueError(f"longtune.apply: FusedCrossEntropyConfig: {e}") from None
    if RoSTEConfig in configs and getattr(base, "longtune_roste_config", None) is None:
        from .quant import decoder

        try:
            decoder(base)
        except TypeError as e:
            raise ValueError(f"longtune.apply: RoSTEConfig: {e}") from None


# ---------------------------------------------------------------- presence of the weight transforms
def _present(model, base, cls) -> bool:
    """Whether the weight transform of ``cls`` is already in the model."""
    if cls is RoSTEConfig:
        return getattr(base, "longtune_roste_config", None) is not None
    if cls is SparseDeltaConfig:
        from ..nn.sparse_delta import SparseDeltaLinear

        return any(isinstance(m, SparseDeltaLinear) for m in base.modules())
    if cls is S2FTConfig:
        from ..nn.s2ft import S2FTLinear

        return any(isinstance(m, S2FTLinear) for m in base.modules())
    if cls is LongLoRAConfig:
        return hasattr(model, "peft_config") and model is not base
    return False


# ------------------------------------------------------------------ apply
def apply(model, *configs):
    """Sets ``model`` (a Hugging Face causal LM, optionally peft-wrapped) up with ``configs``;
    returns the model (the new peft model when a :class:`LongLoRAConfig` is applied: use the
    return value).

    - The configs already applied (recorded in ``model.config.longtune_apply``) are kept; a new
      config of the same type replaces a runtime one (attention, fused loss, chunk-wise) and must
      equal an already applied weight transform (RoSTE, SpIEL, S^2FT, LongLoRA).
    - The whole combination is validated before anything is changed; refused (``ValueError``):
      the Lambda-mask with training (chunk-wise or a trainable-parameter config), S^2
      ``longlora_roll`` with chunk-wise training, the fused loss over a head it cannot represent
      (a quantized ``RotatedQuantLinear`` head, a LoRA head with dropout or DoRA), two configs that
      choose the trainable parameters, RoSTE with SpIEL or S^2FT.
    - With no configs, re-applies the recorded ones: after ``from_pretrained`` of a model saved with
      runtime configs (attention, fused loss, chunk-wise), ``longtune.apply(model)`` restores the
      same setup. Weight transforms recorded but absent from the model are applied again to its
      weights (a base checkpoint set up for training); checkpoints of transformed weights load
      through the family's own path (peft adapters, ``load_sparse_adapter``,
      ``longtune.quant.load_exported``) or a Trainer checkpoint.
    - Idempotent: applying the same configs twice changes nothing."""
    from .hf import hf_model, patch

    base = hf_model(model, "longtune.apply")
    for c in configs:
        if not isinstance(c, CONFIG_TYPES):
            raise TypeError(
                f"longtune.apply: expected configs from longtune.config ({', '.join(_BY_NAME)}), "
                f"got {type(c).__name__}"
            )
    new: dict = {}
    for c in configs:
        if type(c) in new:
            raise ValueError(f"longtune.apply: {type(c).__name__} given twice")
        new[type(c)] = c
    recorded = {type(c): c for c in applied(model)}
    if not configs and not recorded:
        raise ValueError(
            "longtune.apply: pass one or more configs (AttentionConfig, FusedCrossEntropyConfig, "
            "LongLoRAConfig, SparseDeltaConfig, S2FTConfig, RoSTEConfig, ChunkwiseConfig); the "
            f"model carries no recorded configs (model.config.{RECORD_KEY}) to re-apply"
        )
    for cls in (RoSTEConfig, S2FTConfig, SparseDeltaConfig, LongLoRAConfig):
        if (
            cls in new
            and cls in recorded
            and asdict(new[cls]) != asdict(recorded[cls])
            and _present(model, base, cls)
        ):
            raise ValueError(
                f"longtune.apply: the model already has {cls.__name__} applied with other settings "
                f"({recorded[cls]}); a weight transform cannot be changed in place, start from the "
                "original model"
            )
    if RoSTEConfig in new and RoSTEConfig not in recorded and _present(model, base, RoSTEConfig):
        if asdict(base.longtune_roste_config) != asdict(new[RoSTEConfig]):
            raise ValueError(
                "longtune.apply: the model is already RoSTE-prepared with another configuration"
            )
    eff = {**recorded, **new}
    if LongLoRAConfig in eff and AttentionConfig not in eff:
        eff[AttentionConfig] = AttentionConfig(kind="s2")
    _validate(model, base, eff)

    # ---- apply, weights first
    for cls in _ORDER:
        cfg = eff.get(cls)
        if cfg is None:
            continue
        if cls is RoSTEConfig and not _present(model, base, cls):
            from .quant import prepare_roste

            prepare_roste(base, RoSTEConfig(**json.loads(json.dumps(asdict(cfg)))))
        elif cls is S2FTConfig and not _present(model, base, cls):
            from ..train.s2ft import select_and_permute

            select_and_permute(
                base,
                head_ratio=cfg.head_ratio,
                channel_ratio=cfg.channel_ratio,
                seed=cfg.seed,
                fuse_mlp=cfg.fuse_mlp,
            )
        elif cls is SparseDeltaConfig and not _present(model, base, cls):
            from ..train.sparse_delta import sparsify

            sparsify(base, density=cfg.density, target_modules=cfg.target_modules, seed=cfg.seed)
        elif cls is LongLoRAConfig and not _present(model, base, cls):
            from ..recipes import longlora

            model, _ = longlora(
                model,
                cfg.target_context,
                lora_r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=cfg.target_modules,
                trainable=cfg.trainable,
                rope_type=cfg.rope_type,
                patch_attention=False,
                lora_config_kwargs={"use_dora": True} if cfg.use_dora else None,
            )
            base = hf_model(model, "longtune.apply")
        elif cls is AttentionConfig:
            patch(model, attention=cfg.kind, strict=cfg.strict, **cfg.patch_options())
        elif cls is FusedCrossEntropyConfig:
            patch(model, lm_head="fused_ce")
    setattr(base.config, RECORD_KEY, [_to_record(eff[c]) for c in _ORDER if c in eff])
    return model


# ------------------------------------------------------------------ chunk-wise training
def chunkwise_backward(
    model,
    input_ids,
    labels,
    *,
    attention_mask=None,
    num_items_in_batch=None,
    generator=None,
    config: Optional[ChunkwiseConfig] = None,
):
    """``longtune.train.seco_backward`` with the model's applied :class:`ChunkwiseConfig` (or
    ``config``): accumulates the gradient of the causal-LM loss into ``.grad`` and returns the
    detached loss. SpaCO draws from ``generator`` (default: seeded with the config's ``seed``)."""
    from ..train.chunkwise import seco_backward

    cfg = config if config is not None else get_config(model, ChunkwiseConfig)
    if cfg is None:
        raise ValueError(
            "longtune.integrations.apply.chunkwise_backward: the model has no ChunkwiseConfig "
            "applied; longtune.apply(model, ChunkwiseConfig(...)) or pass config="
        )
    if cfg.method == "spaco" and generator is None:
        import torch

        generator = torch.Generator().manual_seed(cfg.seed)
    n = input_ids.shape[-1]
    chunk = min(cfg.chunk_size, n)
    budget = (
        None if cfg.budget is None else min(cfg.budget, -(-n // chunk))
    )  # short sequences: every chunk
    return seco_backward(
        model,
        input_ids,
        labels,
        chunk_size=chunk,
        budget=budget,
        cap=cfg.cap,
        attention_mask=attention_mask,
        generator=generator,
        num_items_in_batch=num_items_in_batch,
        full_loss=cfg.full_loss,
    )
