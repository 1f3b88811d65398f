"""What sparse fine-tuning trained, saved and loaded on its own, and folded back into a plain model.

``save_sparse_adapter(model, dir)`` writes every ``SparseDeltaLinear``'s deltas (the way peft users
save a LoRA): ``dir/sparse_adapter.safetensors`` holds ``<module>.indices`` (int64, sorted flat
indices into the module's weight) and ``<module>.values`` (the deltas, relative to the base weight
the layer was built on) per module; ``dir/sparse_adapter_config.json`` holds the format name and
version, the target modules, the overall density, the dtype, and per module its weight shape
``[out, in]``, number of deltas, dtype and whether it has a bias. ``load_sparse_adapter(model,
dir)`` puts them on a base model (plain ``nn.Linear`` layers become ``SparseDeltaLinear``; already
sparse layers get their deltas replaced), after checking every module before changing any.

``merge_and_unload(model)`` turns a sparse / S²FT fine-tuned model into the plain model it computes:
every ``SparseDeltaLinear`` becomes its ``nn.Linear`` holding W + Δ, every ``S2FTLinear`` its
``nn.Linear`` (the trained block already lives in its weight), every ``S2FTMLP`` the MLP module it
replaced. The result's outputs are bit-identical, and a transformers model saves with
``save_pretrained`` and loads with ``from_pretrained`` like any other.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..nn.quant import RotatedQuantLinear
from ..nn.s2ft import S2FTMLP, S2FTLinear
from ..nn.sparse_delta import SparseDeltaLinear

ADAPTER_CONFIG_NAME = "sparse_adapter_config.json"
ADAPTER_WEIGHTS_NAME = "sparse_adapter.safetensors"
ADAPTER_FORMAT = "longtune.sparse_delta"
ADAPTER_FORMAT_VERSION = 1


def _sparse_layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


@torch.no_grad()
def save_sparse_adapter(model: nn.Module, save_directory: str | os.PathLike) -> dict:
    """Write the deltas of every ``SparseDeltaLinear`` in ``model`` to ``save_directory`` (created
    if needed; see the module docstring for the format). Module names are relative to ``model``.
    Returns the configuration written."""
    from safetensors.torch import save_file

    layers = _sparse_layers(model)
    if not layers:
        raise ValueError(
            "longtune.train.save_sparse_adapter: the model has no SparseDeltaLinear layers "
            "(sparsify it first with longtune.sparsify)"
        )
    tensors, modules = {}, {}
    for name, m in layers.items():
        if not name:
            raise ValueError(
                "longtune.train.save_sparse_adapter: pass the model that contains the "
                "SparseDeltaLinear, not the layer itself"
            )
        tensors[f"{name}.indices"] = m.indices.detach().to("cpu", torch.long).contiguous()
        tensors[f"{name}.values"] = m.delta().cpu().contiguous()
        modules[name] = {
            "shape": [m.out_features, m.in_features],
            "num_deltas": int(m.values.numel()),
            "dtype": _dtype_name(m.values.dtype),
            "bias": m.base.bias is not None,
        }
    dtypes = {info["dtype"] for info in modules.values()}
    total = sum(info["num_deltas"] for info in modules.values())
    size = sum(info["shape"][0] * info["shape"][1] for info in modules.values())
    config = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "target_modules": list(modules),
        "density": total / size if size else 0.0,
        "num_deltas": total,
        "dtype": dtypes.pop() if len(dtypes) == 1 else None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "modules": modules,
    }
    os.makedirs(save_directory, exist_ok=True)
    save_file(
        tensors,
        os.path.join(save_directory, ADAPTER_WEIGHTS_NAME),
        metadata={
            "format": "pt",
            "longtune_format": ADAPTER_FORMAT,
            "format_version": str(ADAPTER_FORMAT_VERSION),
        },
    )
    with open(os.path.join(save_directory, ADAPTER_CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=1)
    return config


def _read_adapter(load_directory) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    cfg_path = os.path.join(load_directory, ADAPTER_CONFIG_NAME)
    w_path = os.path.join(load_directory, ADAPTER_WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"longtune.train.load_sparse_adapter: {p} not found (a directory written by "
                f"longtune.train.save_sparse_adapter holds {ADAPTER_CONFIG_NAME} and "
                f"{ADAPTER_WEIGHTS_NAME})"
            )
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("format") != ADAPTER_FORMAT:
        raise ValueError(
            f"longtune.train.load_sparse_adapter: {cfg_path} is not a sparse-delta adapter "
            f"(format {cfg.get('format')!r}, expected {ADAPTER_FORMAT!r})"
        )
    if int(cfg.get("format_version", 0)) > ADAPTER_FORMAT_VERSION:
        raise ValueError(
            f"longtune.train.load_sparse_adapter: adapter format version {cfg['format_version']} "
            f"is newer than this longtune reads ({ADAPTER_FORMAT_VERSION}); upgrade longtune"
        )
    return cfg, load_file(w_path)


@torch.no_grad()
def load_sparse_adapter(
    model: nn.Module, load_directory: str | os.PathLike, *, trainable: bool = True
) -> nn.Module:
    """Load ``save_sparse_adapter``'s deltas onto ``model`` (in place; returns it). Each target
    module must exist and be an ``nn.Linear`` (or ``SparseDeltaLinear``) of the saved shape, else a
    ``ValueError`` naming it is raised before anything changes. Plain linear layers are wrapped in
    ``SparseDeltaLinear``; every other parameter is frozen as ``longtune.sparsify`` does; the deltas
    train when ``trainable``. Values are cast to each layer's weight dtype (bit-exact when the
    dtypes match)."""
    cfg, tensors = _read_adapter(load_directory)
    plan = []
    for name, info in cfg["modules"].items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"longtune.train.load_sparse_adapter: the adapter has deltas for module {name!r}, "
                f"which the model ({type(model).__name__}) does not have"
            ) from None
        if type(mod) is not nn.Linear and not isinstance(mod, SparseDeltaLinear):
            raise ValueError(
                f"longtune.train.load_sparse_adapter: module {name!r} is a {type(mod).__name__}; "
                "the adapter's deltas go onto an nn.Linear (or SparseDeltaLinear)"
            )
        shape = [mod.out_features, mod.in_features]
        if shape != list(info["shape"]):
            raise ValueError(
                f"longtune.train.load_sparse_adapter: module {name!r} has a weight of shape "
                f"{shape}, the adapter was trained on {list(info['shape'])}"
            )
        if isinstance(mod, SparseDeltaLinear) and mod._folded is not None:
            raise ValueError(
                f"longtune.train.load_sparse_adapter: module {name!r} has merged deltas; unmerge() "
                "them first"
            )
        idx, val = tensors.get(f"{name}.indices"), tensors.get(f"{name}.values")
        if idx is None or val is None:
            raise ValueError(
                f"longtune.train.load_sparse_adapter: {ADAPTER_WEIGHTS_NAME} lacks the indices or "
                f"values of module {name!r}"
            )
        probe = mod if isinstance(mod, SparseDeltaLinear) else None
        numel = shape[0] * shape[1]
        if probe is None:
            err = None
            if idx.dim() != 1 or val.shape != idx.shape:
                err = "indices and values must be 1-D of equal size"
            elif idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                err = "indices must be strictly increasing"
            elif idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                err = f"indices out of range for a {shape[0]} x {shape[1]} weight"
        else:
            err = probe._check_deltas(idx, val)
        if err is not None:
            raise ValueError(f"longtune.train.load_sparse_adapter: module {name!r}: {err}")
        plan.append((name, mod, idx, val))

    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod, idx, val in plan:
        if not isinstance(mod, SparseDeltaLinear):
            layer = SparseDeltaLinear(mod, num_deltas=idx.numel(), seed=0)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            mod = layer
        mod.load_delta_state_dict({"indices": idx, "values": val.to(mod.base.weight.dtype)})
        mod.values.requires_grad_(trainable)
        mod.merged_weight()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """In place (returns ``model``): ``SparseDeltaLinear`` -> its ``nn.Linear`` with W + Δ in the
    weight, ``S2FTLinear`` -> its ``nn.Linear``, ``S2FTMLP`` -> the MLP it replaced with those
    linear layers.
    Outputs stay bit-identical. ``RotatedQuantLinear`` (RoSTE) has no plain equivalent: a model with
    one is refused before anything changes (use ``longtune.quant.export`` for it)."""
    quant = [n for n, m in model.named_modules() if isinstance(m, RotatedQuantLinear)]
    if quant:
        raise ValueError(
            f"longtune.train.merge_and_unload: {quant[0]!r} is a RotatedQuantLinear (RoSTE), which "
            "has no plain equivalent; export a quantized model with longtune.quant.export instead"
        )
    if isinstance(model, (SparseDeltaLinear, S2FTLinear, S2FTMLP)):
        raise ValueError(
            "longtune.train.merge_and_unload: pass the model that contains the layer, not the layer"
        )
    with torch.no_grad():
        for mod in list(model.modules()):
            for name, child in list(mod.named_children()):
                if isinstance(child, S2FTMLP):
                    setattr(mod, name, child.unload())
        for mod in list(model.modules()):
            for name, child in list(mod.named_children()):
                if isinstance(child, SparseDeltaLinear):
                    child.merged_weight()  # the base weight's storage holds W + Δ
                    setattr(mod, name, child.base)
                elif isinstance(child, S2FTLinear):
                    setattr(mod, name, child.base)
    return model
