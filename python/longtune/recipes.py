"""Training recipes that combine longtune kernels with Hugging Face / peft.

``longlora(model, target_context, ...)`` is LongLoRA's recipe: rotary position interpolation to the
new context, LoRA (peft) on the attention projections, embeddings and norms trainable (LongLoRA's
finding: LoRA alone does not adapt to long context), and S^2-Attn in training (full attention in
eval) through ``longtune.patch(model, attention="s2")``.
"""

from __future__ import annotations

from typing import Iterable, Optional

from .integrations._common import attention_modules, base_model, hf_model
from .integrations.hf import patch

NORM_SUFFIXES = ("norm",)


def _rope_interpolate(model, target_context: int, rope_type: str) -> float:
    """Sets linear position interpolation (factor = target / original context) and rebuilds the
    rotary embedding modules. Returns the factor."""
    base = base_model(model)
    cfg = base.config
    orig = getattr(cfg, "longtune_original_context", None) or cfg.max_position_embeddings
    factor = float(target_context) / float(orig)
    if factor > 1.0:
        params = dict(getattr(cfg, "rope_parameters", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        params.update({"rope_type": rope_type, "factor": factor})
        if rope_type in ("yarn", "longrope", "dynamic"):
            params["original_max_position_embeddings"] = orig
        cfg.rope_parameters = params
        cfg.longtune_original_context = orig
        cfg.max_position_embeddings = int(target_context)
        for name, mod in list(base.named_modules()):
            if type(mod).__name__.endswith("RotaryEmbedding"):
                parent = base.get_submodule(name.rsplit(".", 1)[0]) if "." in name else base
                new = type(mod)(config=cfg).to(next(mod.buffers()).device)
                setattr(parent, name.rsplit(".", 1)[-1], new)
    return factor


def longlora(
    model,
    target_context: int,
    *,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    trainable: Iterable[str] = ("embed_tokens", "norm"),
    rope_type: str = "linear",
    group_size_ratio: float = 0.25,
    mode: str = "leakfree",
    patch_attention: bool = True,
    lora_config_kwargs: Optional[dict] = None,
):
    """LongLoRA: returns ``(peft_model, summary)``.

    - rotary position interpolation: ``rope_type="linear"`` with factor target_context / the
      model's ``max_position_embeddings`` (``"dynamic"`` / ``"yarn"`` also accepted), rotary modules
      rebuilt, ``max_position_embeddings`` set to ``target_context``;
    - peft LoRA (r, alpha, dropout) on ``target_modules``;
    - modules whose names end with one of ``trainable`` (default: the embeddings and every norm)
      are made trainable through peft's ``modules_to_save``, so ``save_pretrained`` stores them with
      the adapter (LongLoRA saves them separately);
    - S^2-Attn in training (``longtune.patch(model, attention="s2", group_size_ratio, mode)``).
    ``summary``: trainable / total parameter counts overall and per kind (lora, embeddings, norms),
    the rope factor and the attention patch."""
    from peft import LoraConfig, get_peft_model

    if target_context < 1:
        raise ValueError(f"longlora: target_context must be >= 1, got {target_context}")
    base = hf_model(model, "longtune.recipes.longlora")
    if not list(attention_modules(base)):
        raise ValueError(
            "longlora: the model has no attention modules with q_proj / o_proj (Llama, Qwen2, "
            "Mistral)"
        )
    target_modules = list(target_modules)
    present = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    missing = [t for t in target_modules if t not in present]
    if missing:
        raise ValueError(
            f"longlora: target_modules {missing} match no module of {type(base).__name__} (e.g. "
            "Phi-3 fuses q/k/v into qkv_proj: pass target_modules=('qkv_proj', 'o_proj'))"
        )
    factor = _rope_interpolate(base, target_context, rope_type)
    trainable = tuple(trainable)
    names = sorted(
        {n.rsplit(".", 1)[-1] for n, _ in base.named_modules() if n and n.endswith(trainable)}
    )
    cfg = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        modules_to_save=names or None,
        task_type="CAUSAL_LM",
        **(lora_config_kwargs or {}),
    )
    peft_model = get_peft_model(base, cfg)
    if patch_attention:
        patch(peft_model, attention="s2", group_size_ratio=group_size_ratio, mode=mode)
    counts = {"lora": 0, "embeddings": 0, "norms": 0, "other": 0}
    total = trainable_n = 0
    for n, p in peft_model.named_parameters():
        total += p.numel()
        if not p.requires_grad:
            continue
        trainable_n += p.numel()
        kind = (
            "lora"
            if "lora_" in n
            else "embeddings"
            if "embed" in n
            else "norms"
            if "norm" in n
            else "other"
        )
        counts[kind] += p.numel()
    summary = {
        "trainable": trainable_n,
        "total": total,
        "trainable_fraction": trainable_n / max(total, 1),
        "by_kind": counts,
        "rope_factor": factor,
        "target_context": int(target_context),
        "attention": getattr(base.config, "longtune_patch", None),
    }
    return peft_model, summary
