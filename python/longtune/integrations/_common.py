"""Model access and attention-call plumbing shared by the Hugging Face integrations (``hf``,
``lm_infinite``, ``roste``) and by the code that drives patched models (``longtune.recipes``,
``longtune.train.chunkwise``).

This module imports neither transformers nor any other integration module, so every integration
can import it at module level without an import cycle.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

__all__ = [
    "PATCH_DEFAULTS",
    "ROSTE_PREFIX",
    "attention_modules",
    "base_model",
    "hf_model",
    "padding_mask",
    "patch_options",
]

# the options each ``longtune.patch(model, attention=...)`` kind accepts, with their defaults
PATCH_DEFAULTS = {
    "causal": {},
    "s2": {"group_size_ratio": 0.25, "mode": "leakfree", "s2_in_eval": False, "group_size": None},
    "lambda": {"window": 2048, "n_global": 4, "cap_distance": True},
}

# RoSTE's attention implementation wraps another one; its registered name is this prefix + the
# wrapped name
ROSTE_PREFIX = "longtune_roste_"


def base_model(model):
    """The model inside a peft wrapper (``get_base_model()``), or ``model`` itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def hf_model(model, caller: str):
    """The transformers model inside ``model`` (peft-wrapped or not); a clear error for anything
    else."""
    base = base_model(model)
    if (
        not isinstance(base, nn.Module)
        or getattr(base, "config", None) is None
        or not callable(getattr(base, "set_attn_implementation", None))
    ):
        raise TypeError(
            f"{caller}: expected a Hugging Face transformers model (a PreTrainedModel such as "
            f"LlamaForCausalLM, optionally wrapped by peft), got {type(model).__name__}"
        )
    return base


def attention_modules(model) -> Iterator[nn.Module]:
    """The attention blocks of a transformers model: modules with ``q_proj`` (or a fused
    ``qkv_proj``), ``o_proj`` and a ``layer_idx``."""
    for mod in model.modules():
        if (
            (hasattr(mod, "q_proj") or hasattr(mod, "qkv_proj"))
            and hasattr(mod, "o_proj")
            and hasattr(mod, "layer_idx")
        ):
            yield mod


def patch_options(module, kind: str) -> dict:
    """The patch options of one attention module: those ``patch`` stored on it, else (for
    ``attn_implementation="longtune*"`` set without ``patch``) the model config's stored patch over
    the defaults of ``kind``."""
    opts = getattr(module, "_longtune_options", None)
    if opts is None:
        stored = getattr(getattr(module, "config", None), "longtune_patch", None) or {}
        opts = dict(
            PATCH_DEFAULTS[kind], **{k: v for k, v in stored.items() if k in PATCH_DEFAULTS[kind]}
        )
    return opts


def padding_mask(attention_mask, kv_len: int):
    """The boolean (B, kv_len) key padding mask from the 2-D mask transformers builds for the
    longtune implementations (None stays None)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            "longtune attention expects the 2-D padding mask that transformers builds for it (the "
            f"implementation's mask function); got a {attention_mask.dim()}-D mask"
        )
    m = attention_mask[:, -kv_len:]
    return m if m.dtype == torch.bool else m.bool()
