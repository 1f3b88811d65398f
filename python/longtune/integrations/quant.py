"""RoSTE for Hugging Face Llama / Qwen2 (and architecturally identical) causal LMs.

``prepare_roste(model, ...)`` turns a model into its rotated, quantization-aware form:

1. fold every RMSNorm weight into the linear layers it feeds (q/k/v, gate/up, lm_head) and set the
   norm weight to 1 (RMSNorm then commutes with orthogonal rotations); untie lm_head if tied;
2. merge R1 = D·H/sqrt(d) (D a seeded random +-1 diagonal, H the Hadamard matrix of the hidden size)
   into the embedding, every projection reading the residual stream (W <- W R1) and every
   projection writing it (W <- R1^T W, b <- b R1), and lm_head;
3. merge R2 (per-head Hadamard of head_dim) into v_proj's output and o_proj's input;
4. online R3: q and k rotated per head (after RoPE) before the K/V fake-quantization, through a
   registered attention function that wraps the model's own (sdpa / eager);
5. online R4: the down_proj input rotated by the Hadamard of the intermediate size (fused with its
   activation quantizer); down_proj keeps its weight in the original basis and rotates it on the
   fly - once and cached while the weight is frozen (LoRA / peft), differentiably when it trains -
   so peft's merge of a LoRA delta into that weight stays correct;
6. every decoder projection becomes a ``RotatedQuantLinear`` (per-token activation fake-quant,
   per-channel / per-group weight fake-quant, straight-through gradients); lm_head and the
   embedding stay in floating point.

With every quantizer off (``w_bits=a_bits=kv_bits=None``) the prepared model computes the same
function as the original (tested in float64). Rotations R2/R3/R4 can be switched per layer with a
configuration from ``search_rotation_config`` (JSON: ``{"layers": {"0": {"r2": true, ...}}}``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..config import RoSTEConfig
from ..nn.quant import RotatedQuantLinear
from ..ops.hadamard import hadamard_transform
from ..ops.quant import rotate_fake_quant
from ._common import ROSTE_PREFIX


# ------------------------------------------------------------------ model access
def decoder(model):
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        raise TypeError(
            "longtune.quant.prepare_roste: expected a Hugging Face *ForCausalLM with .model.layers "
            f"and .lm_head (Llama / Qwen2 family), got {type(model).__name__}"
        )
    for i, layer in enumerate(inner.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ["q_proj", "k_proj", "v_proj", "o_proj"]
        if (
            attn is None
            or mlp is None
            or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in names)
            or not all(
                isinstance(getattr(mlp, n, None), nn.Linear)
                for n in ["gate_proj", "up_proj", "down_proj"]
            )
        ):
            raise TypeError(
                f"longtune.quant.prepare_roste: layer {i} is not a Llama/Qwen2-style block "
                "(self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj as nn.Linear)"
            )
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            raise TypeError(
                "longtune.quant.prepare_roste: per-head q/k norms (Qwen3-style) are not supported"
            )
    return inner


def _rms_weight(norm) -> torch.Tensor:
    w = getattr(norm, "weight", None)
    if w is None or "Gemma" in type(norm).__name__:
        raise TypeError(
            f"longtune.quant.prepare_roste: unsupported norm {type(norm).__name__} "
            "(needs an RMSNorm computing x / rms(x) * weight)"
        )
    return w


def _had(x: torch.Tensor) -> torch.Tensor:
    """x @ H / sqrt(n) over the last dimension, in float64."""
    return hadamard_transform(x.double())


# ------------------------------------------------------------------ offline merges (float64)
@torch.no_grad()
def _fold_norms(inner, model):
    for layer in inner.layers:
        g = _rms_weight(layer.input_layernorm).double()
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            lin.weight.copy_(lin.weight.double() * g)
        layer.input_layernorm.weight.fill_(1.0)
        g = _rms_weight(layer.post_attention_layernorm).double()
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
            lin.weight.copy_(lin.weight.double() * g)
        layer.post_attention_layernorm.weight.fill_(1.0)
    g = _rms_weight(inner.norm).double()
    model.lm_head.weight.copy_(model.lm_head.weight.double() * g)
    inner.norm.weight.fill_(1.0)


def _untie(model, inner):
    if (
        model.lm_head.weight is inner.embed_tokens.weight
        or model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
    ):
        model.lm_head.weight = nn.Parameter(inner.embed_tokens.weight.detach().clone())
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False


@torch.no_grad()
def _merge_r1(inner, model, seed: int):
    d = inner.embed_tokens.weight.shape[1]
    gen = torch.Generator().manual_seed(seed)
    sign = (
        (torch.randint(0, 2, (d,), generator=gen) * 2 - 1)
        .double()
        .to(inner.embed_tokens.weight.device)
    )

    def right(w):  # w @ (D H s)   (rows of w live in the residual basis)
        return _had(w.double() * sign)

    def left(w):  # (D H s)^T w  (columns of w ... i.e. w's output lives in the residual basis)
        return _had(w.double().T * sign).T

    inner.embed_tokens.weight.copy_(right(inner.embed_tokens.weight))
    model.lm_head.weight.copy_(right(model.lm_head.weight))
    for layer in inner.layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            lin.weight.copy_(right(lin.weight))
        for lin in (a.o_proj, m.down_proj):
            lin.weight.copy_(left(lin.weight))
            if lin.bias is not None:
                lin.bias.copy_(right(lin.bias.unsqueeze(0)).squeeze(0))


@torch.no_grad()
def _merge_r2(layer, head_dim: int):
    a = layer.self_attn
    wv = a.v_proj.weight.double()  # [kv_heads * hd, hidden]; v = x Wv^T -> v_head @ H2
    a.v_proj.weight.copy_(_had(wv.T.reshape(wv.shape[1], -1, head_dim)).reshape(wv.shape[1], -1).T)
    if a.v_proj.bias is not None:
        a.v_proj.bias.copy_(_had(a.v_proj.bias.double().reshape(-1, head_dim)).reshape(-1))
    wo = (
        a.o_proj.weight.double()
    )  # [hidden, heads * hd]; input rotated per head -> Wo @ blockdiag(H2)
    a.o_proj.weight.copy_(_had(wo.reshape(wo.shape[0], -1, head_dim)).reshape(wo.shape))


def _quant_linear(lin: nn.Linear, cfg: RoSTEConfig, rotate: bool) -> RotatedQuantLinear:
    q = RotatedQuantLinear(
        lin.in_features,
        lin.out_features,
        lin.bias is not None,
        act_bits=cfg.a_bits,
        weight_bits=cfg.w_bits,
        weight_group_size=cfg.w_group_size,
        act_clip_ratio=cfg.a_clip_ratio,
        weight_clip_ratio=cfg.w_clip_ratio,
        act_symmetric=cfg.a_symmetric,
        weight_symmetric=cfg.w_symmetric,
        rotate=rotate,
        ste=cfg.ste,
        device=lin.weight.device,
        dtype=lin.weight.dtype,
    )
    with torch.no_grad():
        q.weight.copy_(lin.weight)
        if lin.bias is not None:
            q.bias.copy_(lin.bias)
    q.weight.requires_grad_(lin.weight.requires_grad)
    return q


# ------------------------------------------------------------------ online R3 + KV quantization
def roste_attention(module, query, key, value, attention_mask, **kwargs):
    """A RoSTE-prepared model's attention function: the online R3 rotation of q / k and the K/V
    fake-quantization, then the wrapped implementation (``module.longtune_roste["base"]``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    st = module.longtune_roste
    if st["r3"]:
        query, key = hadamard_transform(query), hadamard_transform(key)  # per head, orthonormal
    if st["kv_bits"] is not None:
        kw = dict(
            bits=st["kv_bits"],
            symmetric=st["kv_symmetric"],
            clip_ratio=st["kv_clip_ratio"],
            rotate=False,
            ste=st["ste"],
        )
        key, value = (
            rotate_fake_quant(key, **kw),
            rotate_fake_quant(value, **kw),
        )  # per token, per head
    base = st["base"]
    fn = ALL_ATTENTION_FUNCTIONS[base] if base != "eager" else st["eager"]
    return fn(module, query, key, value, attention_mask, **kwargs)


def _install_attention(model, inner, cfg: RoSTEConfig):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    base = getattr(model.config, "_attn_implementation", None) or "eager"
    if base.startswith(ROSTE_PREFIX):
        raise RuntimeError("longtune.quant.prepare_roste: the model is already prepared")
    name = ROSTE_PREFIX + base  # the wrapped implementation decides the mask format too
    AttentionInterface.register(name, roste_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    eager = None
    if base == "eager":
        import importlib

        eager = importlib.import_module(
            type(inner.layers[0].self_attn).__module__
        ).eager_attention_forward
    for i, layer in enumerate(inner.layers):
        rot = cfg.rotations(i)
        layer.self_attn.longtune_roste = {
            "r3": rot["r3"],
            "kv_bits": cfg.kv_bits,
            "kv_symmetric": cfg.kv_symmetric,
            "kv_clip_ratio": cfg.kv_clip_ratio,
            "ste": cfg.ste,
            "base": base,
            "eager": eager,
        }
    model.config._attn_implementation = name
    for mod in model.modules():
        if (
            hasattr(mod, "config")
            and mod.config is not model.config
            and hasattr(mod.config, "_attn_implementation")
        ):
            mod.config._attn_implementation = name


def prepare_roste(model, config: RoSTEConfig | dict | str | None = None, **overrides):
    """Prepare a Hugging Face Llama / Qwen2 causal LM for RoSTE quantization-aware fine-tuning, in
    place (see the module docstring). ``config``: a RoSTEConfig, a dict, a JSON string / path (e.g.
    from ``search_rotation_config``); keyword overrides win. Returns the model."""
    if getattr(model, "longtune_roste_config", None) is not None:
        raise RuntimeError("longtune.quant.prepare_roste: the model is already prepared")
    if config is None:
        cfg = RoSTEConfig()
    elif isinstance(config, RoSTEConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = RoSTEConfig(**config)
    else:
        cfg = RoSTEConfig.from_json(config)
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"longtune.quant.prepare_roste: unknown option {k!r}")
        setattr(cfg, k, v)
    inner = decoder(model)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    _untie(model, inner)
    _fold_norms(inner, model)
    if cfg.r1:
        _merge_r1(inner, model, cfg.seed)
    for i, layer in enumerate(inner.layers):
        rot = cfg.rotations(i)
        if rot["r2"]:
            _merge_r2(layer, head_dim)
        a, m = layer.self_attn, layer.mlp
        for parent, name in [
            (a, "q_proj"),
            (a, "k_proj"),
            (a, "v_proj"),
            (a, "o_proj"),
            (m, "gate_proj"),
            (m, "up_proj"),
            (m, "down_proj"),
        ]:
            setattr(
                parent,
                name,
                _quant_linear(
                    getattr(parent, name), cfg, rotate=(name == "down_proj" and rot["r4"])
                ),
            )
    _install_attention(model, inner, cfg)
    model.longtune_roste_config = cfg
    return model


# ------------------------------------------------------------------ adaptive rotation search
def _rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).pow(2).sum() / exact.pow(2).sum().clamp_min(1e-30))


def _fq(x, bits, symmetric, clip, granularity="per_token", group_size=None):
    return rotate_fake_quant(
        x.float(),
        bits=bits,
        symmetric=symmetric,
        clip_ratio=clip,
        rotate=False,
        granularity=granularity,
        group_size=group_size,
    ).double()


def _linear_error(x, w, rot, cfg: RoSTEConfig) -> float:
    """Relative error of Q_a(x R) Q_w(W R)^T against x W^T (R = rot, or the identity)."""
    x, w = x.double(), w.double()
    xr, wr = (rot(x), rot(w)) if rot is not None else (x, w)
    xq = _fq(xr, cfg.a_bits, cfg.a_symmetric, cfg.a_clip_ratio) if cfg.a_bits else xr
    gran = "per_group" if cfg.w_group_size else "per_token"
    wq = (
        _fq(wr, cfg.w_bits, cfg.w_symmetric, cfg.w_clip_ratio, gran, cfg.w_group_size)
        if cfg.w_bits
        else wr
    )
    return _rel_err(xq @ wq.T, x @ w.T)


def _kv_error(t, rot, inv, cfg: RoSTEConfig) -> float:
    """Relative error of the per-head K/V fake quantization with / without a per-head rotation."""
    t = t.double()
    if not cfg.kv_bits:
        return 0.0
    tr = rot(t) if rot is not None else t
    q = _fq(tr, cfg.kv_bits, cfg.kv_symmetric, cfg.kv_clip_ratio)
    return _rel_err(inv(q) if rot is not None else q, t)


@torch.no_grad()
def search_rotation_config(
    model,
    calib_batches,
    *,
    n_samples: int = 128,
    config: RoSTEConfig | None = None,
    save_to: str | None = None,
) -> RoSTEConfig:
    """Calibrate which of R2 / R3 / R4 to use per layer: for each layer and rotation, the weight +
    activation (and K/V) quantization error with and without it, measured on up to ``n_samples``
    calibration sequences; the lower error wins (compared as numbers). Returns a RoSTEConfig with
    ``layers`` filled (and ``layers[i]["errors"]`` recording the measurements); writes it as JSON to
    ``save_to`` when given. Run it on the model before ``prepare_roste`` (K is measured before
    RoPE).
    """
    cfg = RoSTEConfig(**asdict(config)) if config is not None else RoSTEConfig()
    inner = decoder(model)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    captured: dict = {}
    hooks = []

    def grab(key, kind):
        def hook(mod, inp, out):
            t = (inp[0] if kind == "in" else out).detach()
            captured.setdefault(key, []).append(t.reshape(-1, t.shape[-1]).double().cpu())

        return hook

    for i, layer in enumerate(inner.layers):
        hooks += [
            layer.mlp.down_proj.register_forward_hook(grab((i, "down_in"), "in")),
            layer.self_attn.o_proj.register_forward_hook(grab((i, "o_in"), "in")),
            layer.self_attn.k_proj.register_forward_hook(grab((i, "k"), "out")),
            layer.self_attn.v_proj.register_forward_hook(grab((i, "v"), "out")),
        ]
    seen = 0
    try:
        for batch in calib_batches:
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            ids = ids[: max(0, n_samples - seen)]
            if ids.shape[0] == 0:
                break
            model(ids.to(model.lm_head.weight.device))
            seen += ids.shape[0]
            if seen >= n_samples:
                break
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise ValueError("longtune.quant.search_rotation_config: calib_batches gave no samples")

    def per_head(t):
        return _had(t.reshape(*t.shape[:-1], -1, head_dim)).reshape(t.shape)

    def per_head_inv(t):
        return torch.ops.longtune.hadamard_transform_backward(
            t.reshape(*t.shape[:-1], -1, head_dim).contiguous(), 1 / math.sqrt(head_dim)
        ).reshape(t.shape)

    layers = {}
    for i, layer in enumerate(inner.layers):
        cat = {k: torch.cat(captured[(i, k)]) for k in ("down_in", "o_in", "k", "v")}
        wo, wd = (
            layer.self_attn.o_proj.weight.double().cpu(),
            layer.mlp.down_proj.weight.double().cpu(),
        )
        err = {
            "r2": (
                _linear_error(cat["o_in"], wo, per_head, cfg)
                + _kv_error(cat["v"], per_head, per_head_inv, cfg),
                _linear_error(cat["o_in"], wo, None, cfg) + _kv_error(cat["v"], None, None, cfg),
            ),
            "r3": (
                _kv_error(cat["k"], per_head, per_head_inv, cfg),
                _kv_error(cat["k"], None, None, cfg),
            ),
            "r4": (
                _linear_error(cat["down_in"], wd, _had, cfg),
                _linear_error(cat["down_in"], wd, None, cfg),
            ),
        }
        layers[str(i)] = {r: bool(w < wo_) for r, (w, wo_) in err.items()}
        layers[str(i)]["errors"] = {r: {"with": w, "without": wo_} for r, (w, wo_) in err.items()}
    cfg.layers = layers
    if save_to:
        Path(save_to).write_text(cfg.to_json())
    return cfg


# ------------------------------------------------------------------ export / load
def _quant_linears(model):
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, RotatedQuantLinear)}


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    u = codes.to(torch.int16) & 0xFF if bits == 8 else codes.to(torch.int16) & 0xF
    if bits > 4:
        return u.to(torch.uint8)
    flat = u.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, shape, symmetric: bool) -> torch.Tensor:
    p = packed.to(torch.int16)
    if bits > 4:
        v = p
        if symmetric:
            v = torch.where(v >= 128, v - 256, v)
        return v.reshape(shape)
    v = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(-1)[: math.prod(shape)]
    if symmetric:
        v = torch.where(v >= 8, v - 16, v)
    return v.reshape(shape)


@torch.no_grad()
def export(model, path: str) -> dict:
    """Write a prepared model as safetensors: every quantized projection as packed integer codes
    (two 4-bit codes per byte for bits <= 4, one byte for 8 bits) + float32 scales / zeros, every
    other parameter and buffer as is, the RoSTE configuration in the metadata. Returns a summary."""
    from safetensors.torch import save_file

    cfg = getattr(model, "longtune_roste_config", None)
    if cfg is None:
        raise ValueError(
            "longtune.quant.export: the model was not prepared with longtune.quant.prepare_roste"
        )
    qlin = _quant_linears(model)
    tensors, layout = {}, {}
    for name, mod in qlin.items():
        if mod.weight_bits is None:
            continue
        w = mod.rotated_weight()
        gran = "per_group" if mod.weight_group_size else "per_token"
        codes, scales, zeros = torch.ops.longtune.rotate_quantize(
            w.detach().float().contiguous(),
            mod.weight_bits,
            gran,
            mod.weight_group_size or 0,
            mod.weight_symmetric,
            mod.weight_clip_ratio,
            False,
            0,
        )
        tensors[f"{name}.qweight"] = _pack(codes.cpu(), mod.weight_bits)
        tensors[f"{name}.scales"] = scales.cpu()
        tensors[f"{name}.zeros"] = zeros.cpu()
        layout[name] = {
            "bits": mod.weight_bits,
            "shape": list(w.shape),
            "symmetric": mod.weight_symmetric,
            "dtype": str(w.dtype).replace("torch.", ""),
        }
    skip = {f"{n}.weight" for n in layout}
    for name, t in model.state_dict().items():
        if name not in skip:
            tensors[name] = t.detach().cpu().contiguous()
    save_file(
        tensors, path, metadata={"longtune_roste": cfg.to_json(), "layout": json.dumps(layout)}
    )
    nbytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith(".qweight"))
    return {"quantized_layers": len(layout), "packed_weight_bytes": nbytes, "path": path}


@torch.no_grad()
def load_exported(model, path: str):
    """Load ``export``'s file into a model of the same architecture (prepared or not: an unprepared
    model is prepared with the saved configuration first). Quantized projections get the
    dequantized integer weights and skip their weight fake-quantizer, so the loaded model
    reproduces the fake-quant model's outputs."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = RoSTEConfig.from_json(meta["longtune_roste"])
    layout = json.loads(meta["layout"])
    if getattr(model, "longtune_roste_config", None) is None:
        prepare_roste(model, cfg)
    qlin = _quant_linears(model)
    state = {k: v for k, v in tensors.items() if not k.endswith((".qweight", ".scales", ".zeros"))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # files written before the quantizer state was part of the state dict have no `_extra_state`
    expected_missing = {f"{n}.weight" for n in layout} | {f"{n}._extra_state" for n in qlin}
    if set(missing) - expected_missing or unexpected:
        raise ValueError(
            "longtune.quant.load_exported: state mismatch (missing "
            f"{sorted(set(missing) - expected_missing)}, unexpected {sorted(unexpected)})"
        )
    for name, info in layout.items():
        mod = qlin[name]
        codes = _unpack(tensors[f"{name}.qweight"], info["bits"], info["shape"], info["symmetric"])
        scales, zeros = tensors[f"{name}.scales"], tensors[f"{name}.zeros"]
        groups = scales.shape[-1]
        cg = codes.to(torch.float32).reshape(info["shape"][0], groups, -1)
        w = ((cg - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(info["shape"])
        mod.weight.copy_(w.to(mod.weight.dtype))
        mod.weight_is_quantized = True
        mod.prerotated_weight = True  # the stored weight is already in the rotated basis
    return model
