"""S²FT selection for Hugging Face Llama / Qwen2: pick a few attention heads (v / o) and FFN
channels (up / down) per block, co-permute the coupled weights so that the picks are contiguous
(the permuted model computes exactly the same function), and wrap the four projections in
``S2FTLinear`` with the picked block trainable. GQA is handled at the granularity of key/value
heads: a picked kv head brings the query heads of its group with it (q/k/v rows and o columns are
permuted together), unlike the official code, which indexes kv heads with query-head indices."""

from __future__ import annotations

import torch
from torch import nn

from ..nn.s2ft import S2FTMLP, S2FTLinear


def _perm_rows(lin: nn.Linear, perm: torch.Tensor):
    lin.weight.data = lin.weight.data[perm].contiguous()
    if lin.bias is not None:
        lin.bias.data = lin.bias.data[perm].contiguous()


def _perm_cols(lin: nn.Linear, perm: torch.Tensor):
    lin.weight.data = lin.weight.data[:, perm].contiguous()


def _head_rows(head_order: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (head_order[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


@torch.no_grad()
def select_and_permute(
    model,
    *,
    head_ratio: float = 0.03,
    channel_ratio: float = 0.03,
    seed: int = 0,
    freeze_others: bool = True,
    fuse_mlp: bool = True,
) -> dict:
    """In place. Returns {layer index: {"kv_heads": [...], "channels": [...]}} (original ids).
    ``fuse_mlp``: SiLU-gated MLPs with a frozen gate become ``S2FTMLP`` (one autograd function for
    the block, partial backprop through it; same parameters and state-dict keys)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise TypeError(
            f"longtune.train.s2ft.select_and_permute: expected a Hugging Face *ForCausalLM with "
            f".model.layers, got {type(model).__name__}"
        )
    if not (0 < head_ratio <= 1) or not (0 < channel_ratio <= 1):
        raise ValueError(
            f"select_and_permute: head_ratio and channel_ratio must be in (0, 1], got {head_ratio} "
            f"and {channel_ratio}"
        )
    c = model.config
    hq, hkv = (
        c.num_attention_heads,
        getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
    )
    hd = getattr(c, "head_dim", None) or c.hidden_size // hq
    group = hq // hkv
    if freeze_others:
        for p in model.parameters():
            p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    picks = {}
    for i, layer in enumerate(inner.layers):
        a, m = layer.self_attn, layer.mlp
        n_kv = max(1, round(head_ratio * hkv))
        kv_order = torch.randperm(hkv, generator=gen)
        kv_order = torch.cat([kv_order[:n_kv].sort().values, kv_order[n_kv:].sort().values])
        q_order = (kv_order[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
        _perm_rows(a.q_proj, _head_rows(q_order, hd))
        _perm_rows(a.k_proj, _head_rows(kv_order, hd))
        _perm_rows(a.v_proj, _head_rows(kv_order, hd))
        _perm_cols(a.o_proj, _head_rows(q_order, hd))
        inter = m.up_proj.out_features
        n_ch = max(1, round(channel_ratio * inter))
        ch = torch.randperm(inter, generator=gen)
        ch_order = torch.cat([ch[:n_ch].sort().values, ch[n_ch:].sort().values])
        _perm_rows(m.gate_proj, ch_order)
        _perm_rows(m.up_proj, ch_order)
        _perm_cols(m.down_proj, ch_order)
        a.v_proj = S2FTLinear(a.v_proj, 0, n_kv * hd, "out")
        a.o_proj = S2FTLinear(a.o_proj, 0, n_kv * group * hd, "in")
        m.up_proj = S2FTLinear(m.up_proj, 0, n_ch, "out")
        m.down_proj = S2FTLinear(m.down_proj, 0, n_ch, "in")
        if fuse_mlp and not m.gate_proj.weight.requires_grad:
            try:
                layer.mlp = S2FTMLP(m)
            except (TypeError, ValueError):  # not a plain SiLU gated MLP: keep the two S2FTLinear
                pass
        picks[i] = {"kv_heads": kv_order[:n_kv].tolist(), "channels": ch_order[:n_ch].tolist()}
    return picks
