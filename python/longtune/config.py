"""Typed configurations of longtune's features (the verb that applies them is ``longtune.apply``,
defined in :mod:`longtune.integrations.apply`).

``longtune.apply(model, *configs)`` sets a Hugging Face causal LM up for training (or inference)
with any supported combination of:

- :class:`AttentionConfig` -- S^2-Attn (LongLoRA), causal flash attention, or the Lambda-mask
  (LM-Infinite, inference only);
- :class:`FusedCrossEntropyConfig` -- the vocabulary head fused into the loss (no logits);
- :class:`LongLoRAConfig` -- rotary interpolation + LoRA + trainable embeddings / norms;
- :class:`SparseDeltaConfig` -- SpIEL sparse deltas (and their prune / regrow schedule);
- :class:`S2FTConfig` -- S^2FT structured selection;
- :class:`RoSTEConfig` -- rotated quantization-aware training;
- :class:`ChunkwiseConfig` -- SeCO / SpaCO chunk-wise training (used by
  :class:`longtune.integrations.trainer.LongtuneTrainer` and by
  :func:`longtune.integrations.apply.chunkwise_backward`).

The combination is validated before the model is touched (the combinations longtune cannot
compute exactly are refused with an error naming them), the configs are applied through the
family functions (``longtune.patch``, ``longtune.recipes.longlora``, ``longtune.sparsify``,
``longtune.train.s2ft.select_and_permute``, ``longtune.quant.prepare_roste``, which stay available
as they are), and the set is recorded in ``model.config.longtune_apply`` (JSON), so that
``save_pretrained`` keeps it and ``longtune.apply(model)`` after ``from_pretrained`` restores the
same setup. Applying the same configs again changes nothing.

This module imports only the standard library: the configs are plain data, and the modules that
act on them (the integrations, the trainers) import them from here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "AttentionConfig",
    "FusedCrossEntropyConfig",
    "LongLoRAConfig",
    "SparseDeltaConfig",
    "S2FTConfig",
    "RoSTEConfig",
    "ChunkwiseConfig",
    "applied",
    "get_config",
    "CONFIG_TYPES",
    "RECORD_KEY",
]

# model.config attribute holding the applied configs (a JSON-serialisable list)
RECORD_KEY = "longtune_apply"


def _check(cond: bool, cls: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{cls}: {msg}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ------------------------------------------------------------------ the configs
@dataclass
class AttentionConfig:
    """The attention of the model's decoder layers (``longtune.patch(model, attention=kind, ...)``).

    ``kind="s2"``: S^2-Attn in training, full causal attention in eval (LongLoRA); groups of
    ``group_size`` tokens, or ``group_size_ratio`` times the sequence length; ``s2_mode``
    ``"leakfree"`` (default, also chunk-wise) or ``"longlora_roll"`` (LongLoRA's roll; full backprop
    only); ``s2_in_eval`` keeps S^2 in eval.
    ``kind="causal"``: causal flash attention through longtune's kernels.
    ``kind="lambda"``: LM-Infinite's Lambda-mask (``n_global`` first tokens + a ``window``, rotary
    distance capped when ``cap_distance``), for inference beyond the trained length only.
    ``strict=False`` tries model families outside the tested list."""

    kind: str = "s2"
    group_size_ratio: float = 0.25
    group_size: Optional[int] = None
    s2_mode: str = "leakfree"
    s2_in_eval: bool = False
    window: int = 2048
    n_global: int = 4
    cap_distance: bool = True
    strict: bool = True

    def __post_init__(self):
        n = "AttentionConfig"
        _check(
            self.kind in ("s2", "causal", "lambda"),
            n,
            f"kind must be 's2', 'causal' or 'lambda', got {self.kind!r}",
        )
        _check(
            isinstance(self.group_size_ratio, (int, float)) and 0 < self.group_size_ratio <= 1,
            n,
            f"group_size_ratio must be in (0, 1], got {self.group_size_ratio!r}",
        )
        _check(
            self.group_size is None or (_is_int(self.group_size) and self.group_size >= 1),
            n,
            f"group_size must be a positive int or None, got {self.group_size!r}",
        )
        _check(
            self.s2_mode in ("leakfree", "longlora_roll"),
            n,
            f"s2_mode must be 'leakfree' or 'longlora_roll', got {self.s2_mode!r}",
        )
        _check(
            _is_int(self.window) and self.window >= 1,
            n,
            f"window must be an int >= 1, got {self.window!r}",
        )
        _check(
            _is_int(self.n_global) and self.n_global >= 0,
            n,
            f"n_global must be an int >= 0, got {self.n_global!r}",
        )

    def patch_options(self) -> dict:
        if self.kind == "s2":
            return {
                "group_size_ratio": float(self.group_size_ratio),
                "mode": self.s2_mode,
                "s2_in_eval": bool(self.s2_in_eval),
                "group_size": self.group_size,
            }
        if self.kind == "lambda":
            return {
                "window": self.window,
                "n_global": self.n_global,
                "cap_distance": bool(self.cap_distance),
            }
        return {}


@dataclass
class FusedCrossEntropyConfig:
    """The vocabulary head fused into the loss (``longtune.patch(model, lm_head="fused_ce")``): with
    labels the loss comes from the hidden states through ``longtune.linear_cross_entropy`` and the
    logits are never materialised. Heads: ``nn.Linear``, SpIEL / S^2FT heads, peft LoRA heads
    without dropout or DoRA (a quantized ``RotatedQuantLinear`` head is refused)."""


@dataclass
class LongLoRAConfig:
    """LongLoRA (``longtune.recipes.longlora``): rotary position interpolation to
    ``target_context`` (``rope_type``), peft LoRA (``lora_r``, ``lora_alpha``, ``lora_dropout``,
    ``use_dora``) on ``target_modules``, and the modules named by ``trainable`` (embeddings, norms)
    trained in full. S^2-Attn comes from an :class:`AttentionConfig` (``apply`` adds
    ``AttentionConfig(kind="s2")`` when none is given). ``apply`` returns the peft model."""

    target_context: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    use_dora: bool = False
    target_modules: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    trainable: tuple = ("embed_tokens", "norm")
    rope_type: str = "linear"

    def __post_init__(self):
        n = "LongLoRAConfig"
        self.target_modules, self.trainable = tuple(self.target_modules), tuple(self.trainable)
        _check(
            _is_int(self.target_context) and self.target_context >= 1,
            n,
            "target_context must be an int >= 1 (the context length to train for), got "
            f"{self.target_context!r}",
        )
        _check(
            _is_int(self.lora_r) and self.lora_r >= 1,
            n,
            f"lora_r must be an int >= 1, got {self.lora_r!r}",
        )
        _check(
            0 <= self.lora_dropout < 1,
            n,
            f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}",
        )
        _check(len(self.target_modules) > 0, n, "target_modules must name at least one module")
        _check(
            self.rope_type in ("linear", "dynamic", "yarn"),
            n,
            f"rope_type must be 'linear', 'dynamic' or 'yarn', got {self.rope_type!r}",
        )


@dataclass
class SparseDeltaConfig:
    """SpIEL sparse-delta fine-tuning (``longtune.sparsify``): every ``nn.Linear`` matching
    ``target_modules`` (name suffixes or a regex; None: all) gets ``density`` of its weight as
    trainable deltas; everything else is frozen. ``update_every`` (None: fixed deltas) turns on the
    prune / regrow schedule (``SpIELScheduler``: ``window``, ``drop_fraction``, ``decay``,
    ``total_steps``, ``growth``), which :class:`~longtune.integrations.trainer.LongtuneTrainer`
    runs after every optimizer step."""

    density: float = 0.01
    target_modules: Union[tuple, str, None] = None
    seed: Optional[int] = None
    update_every: Optional[int] = None
    window: int = 5
    drop_fraction: float = 0.2
    decay: str = "cosine"
    total_steps: Optional[int] = None
    growth: str = "ag"

    def __post_init__(self):
        n = "SparseDeltaConfig"
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        _check(
            isinstance(self.density, (int, float)) and 0 < self.density <= 1,
            n,
            f"density must be in (0, 1], got {self.density!r}",
        )
        _check(
            self.update_every is None or (_is_int(self.update_every) and self.update_every >= 1),
            n,
            f"update_every must be a positive int or None, got {self.update_every!r}",
        )
        if self.update_every is not None:
            _check(
                _is_int(self.window) and 1 <= self.window <= self.update_every,
                n,
                f"window must be in [1, update_every={self.update_every}], got {self.window!r}",
            )
        _check(
            0 <= self.drop_fraction <= 1,
            n,
            f"drop_fraction must be in [0, 1], got {self.drop_fraction!r}",
        )
        _check(
            self.decay in ("cosine", "linear", "constant"),
            n,
            f"decay must be 'cosine', 'linear' or 'constant', got {self.decay!r}",
        )
        _check(self.growth in ("ag", "ma"), n, f"growth must be 'ag' or 'ma', got {self.growth!r}")

    def scheduler_options(self) -> dict:
        return {
            "update_every": self.update_every,
            "window": self.window,
            "drop_fraction": self.drop_fraction,
            "decay": self.decay,
            "total_steps": self.total_steps,
            "growth": self.growth,
        }


@dataclass
class S2FTConfig:
    """S^2FT (``longtune.train.s2ft.select_and_permute``): ``head_ratio`` of the key/value heads and
    ``channel_ratio`` of the FFN channels per block trainable, picked with ``seed``; ``fuse_mlp``
    fuses SiLU-gated MLPs into one autograd function."""

    head_ratio: float = 0.03
    channel_ratio: float = 0.03
    seed: int = 0
    fuse_mlp: bool = True

    def __post_init__(self):
        _check(
            0 < self.head_ratio <= 1 and 0 < self.channel_ratio <= 1,
            "S2FTConfig",
            f"head_ratio and channel_ratio must be in (0, 1], got {self.head_ratio!r} and "
            f"{self.channel_ratio!r}",
        )


@dataclass
class RoSTEConfig:
    """RoSTE quantization-aware training (``longtune.quant.prepare_roste``): weight / activation /
    KV bits (None: that quantizer off), groups, clipping, symmetry, the straight-through estimator,
    the R1 rotation and its seed, and per-layer R2/R3/R4 switches
    (``layers={"<i>": {"r2": bool, "r3": bool, "r4": bool}}``, e.g. from
    ``longtune.quant.search_rotation_config``)."""

    w_bits: int | None = 4
    a_bits: int | None = 4
    kv_bits: int | None = 4
    w_group_size: int | None = None
    w_clip_ratio: float = 1.0
    a_clip_ratio: float = 1.0
    kv_clip_ratio: float = 1.0
    w_symmetric: bool = True
    a_symmetric: bool = True
    kv_symmetric: bool = False
    ste: str = "identity"
    r1: bool = True
    seed: int = 0
    layers: dict = field(default_factory=dict)  # {"<i>": {"r2": bool, "r3": bool, "r4": bool}}

    def rotations(self, i: int) -> dict:
        d = {"r2": True, "r3": True, "r4": True}
        d.update(self.layers.get(str(i), {}))
        return d

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text_or_path) -> "RoSTEConfig":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        return cls(**json.loads(text))


@dataclass
class ChunkwiseConfig:
    """Chunk-wise training (``longtune.train.seco_backward``): ``method="seco"`` (exact: the
    gradient of full backprop) or ``"spaco"`` (``budget`` of the chunks backpropagated, factors
    clipped at ``cap``; ``seed`` seeds the draw of every step), in chunks of ``chunk_size`` tokens.
    ``full_loss=False`` (SpaCO) reports the unbiased loss estimate and skips the head of the
    chunks that are not drawn. Applying it only records it: the training loop
    (:class:`~longtune.integrations.trainer.LongtuneTrainer`, or :func:`chunkwise_backward`) runs
    it."""

    method: str = "seco"
    chunk_size: int = 0
    budget: Optional[int] = None
    cap: Optional[float] = 2.0
    full_loss: bool = True
    seed: int = 0

    def __post_init__(self):
        n = "ChunkwiseConfig"
        _check(
            self.method in ("seco", "spaco"),
            n,
            f"method must be 'seco' or 'spaco', got {self.method!r}",
        )
        _check(
            _is_int(self.chunk_size) and self.chunk_size >= 1,
            n,
            f"chunk_size must be an int >= 1 (tokens per chunk), got {self.chunk_size!r}",
        )
        if self.method == "spaco":
            _check(
                _is_int(self.budget) and self.budget >= 1,
                n,
                "method='spaco' needs budget (the number of chunks backpropagated) as an int >= 1, "
                f"got {self.budget!r}",
            )
        else:
            _check(
                self.budget is None,
                n,
                f"method='seco' backpropagates every chunk; budget must be None, "
                f"got {self.budget!r} (use method='spaco')",
            )
        _check(
            self.cap is None or self.cap > 0, n, f"cap must be positive or None, got {self.cap!r}"
        )


CONFIG_TYPES = (
    AttentionConfig,
    FusedCrossEntropyConfig,
    LongLoRAConfig,
    SparseDeltaConfig,
    S2FTConfig,
    RoSTEConfig,
    ChunkwiseConfig,
)
_BY_NAME = {c.__name__: c for c in CONFIG_TYPES}
# the order in which apply() applies them: weights first (RoSTE on the plain model), then the
# trainable selection, then LoRA, then the runtime patches
_ORDER = (
    RoSTEConfig,
    S2FTConfig,
    SparseDeltaConfig,
    LongLoRAConfig,
    AttentionConfig,
    FusedCrossEntropyConfig,
    ChunkwiseConfig,
)
_TRAINABLE = (LongLoRAConfig, SparseDeltaConfig, S2FTConfig)


# ------------------------------------------------------------------ records
def _to_record(cfg) -> dict:
    d = {"type": type(cfg).__name__}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        d[f.name] = list(v) if isinstance(v, tuple) else v
    return json.loads(json.dumps(d))  # JSON-serialisable, plain types


def _from_record(rec: dict):
    rec = dict(rec)
    name = rec.pop("type", None)
    if name not in _BY_NAME:
        raise ValueError(
            f"longtune.apply: model.config.{RECORD_KEY} holds an unknown config type {name!r}; "
            f"known: {sorted(_BY_NAME)}"
        )
    return _BY_NAME[name](**rec)


def _base_config(model):
    get = getattr(model, "get_base_model", None)
    base = get() if callable(get) else model
    return getattr(base, "config", None)


def applied(model) -> list:
    """The configs recorded on ``model`` by :func:`apply` (in application order), as config
    objects."""
    cfg = _base_config(model)
    recs = getattr(cfg, RECORD_KEY, None) or []
    return [_from_record(r) for r in recs]


def get_config(model, cls):
    """The applied config of type ``cls`` on ``model``, or None."""
    for c in applied(model):
        if isinstance(c, cls):
            return c
    return None
