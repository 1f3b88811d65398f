"""LM-Infinite for Hugging Face causal LMs: generation beyond the trained length with the
Lambda-mask (the first ``n_global`` tokens + a window of ``window`` recent tokens) and the rotary
distance cap (a global token further than the window is seen at the capped distance), plus a KV
cache that keeps only the global tokens and the window (memory O(n_global + window)).

The attention of a query at position p is split in two longtune calls merged by their
log-sum-exps: (A) the non-global keys, causal with the window (i - j < window), rotary as is;
(B) the global keys (positions < n_global), causal, with the query re-rotated to position
min(p, window) -- RoPE rotations compose, so q is turned by (min(p, window) - p) in place of a
second projection. Inference only (the merge uses lse, which carries no gradient).
"""

from __future__ import annotations

import torch

from ..ops.attention import sparse_attention
from ._common import base_model, padding_mask, patch_options


def _inv_freq(module, device):
    """The model's rotary inverse frequencies (with its rope scaling) for the relative turn of q."""
    cache = getattr(module, "_longtune_inv_freq", None)
    if cache is not None and cache.device == device:
        return cache
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = module.config
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inv = 1.0 / (
            base
            ** (torch.arange(0, d, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / d)
        )
    else:
        inv, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, device)
    module._longtune_inv_freq = inv
    return inv


def _turn(q, delta, inv_freq):
    """Rotate q (B, N, H, D) (rotate-half RoPE layout) by delta (N,) positions."""
    ang = delta.to(torch.float32)[:, None] * inv_freq[None].to(torch.float32)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None].to(q.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None].to(q.dtype)
    d = q.shape[-1]
    q1, q2 = q[..., : d // 2], q[..., d // 2 :]
    return q * cos + torch.cat([-q2, q1], -1) * sin


def _merge(o1, l1, o2, l2):
    """Combine two partial attentions over disjoint key sets from their outputs and lse (B, H,
    N)."""
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    den = w1 + w2
    den = torch.where(den > 0, den, torch.ones_like(den))
    w1 = (w1 / den).transpose(1, 2).unsqueeze(-1).to(o1.dtype)  # (B, N, H, 1)
    w2 = (w2 / den).transpose(1, 2).unsqueeze(-1).to(o1.dtype)
    return o1 * w1 + o2 * w2


def lambda_attention_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs
):
    """``attn_implementation="longtune_lambda"`` (see the module docstring)."""
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        raise RuntimeError(
            "longtune_lambda attention is for inference (generation beyond the trained length); "
            "run it under torch.no_grad() / inference_mode, or train with attention='s2' or "
            "'causal'"
        )
    o = patch_options(module, "lambda")
    window, n_g, cap = int(o["window"]), int(o["n_global"]), bool(o["cap_distance"])
    softcap = kwargs.get("softcap") or None  # attention logit softcapping (Gemma-2)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    nq, nk = q.shape[1], k.shape[1]
    pos = kwargs.get("position_ids")
    last = int(pos[0, -1]) if pos is not None else nk - 1  # position of the last query
    first_q = last - nq + 1
    evicted = last + 1 > nk  # the Lambda cache dropped the middle: keys = [global | recent]
    kpm = padding_mask(attention_mask, nk)
    g = min(n_g, nk)
    if evicted:
        rec_pos0 = last + 1 - (nk - g)
    else:
        rec_pos0 = g
    # (A) recent (non-global) keys, window + causal on absolute positions
    ka, va = k[:, g:], v[:, g:]
    skip = max(0, rec_pos0 - first_q)  # queries before the first recent key see none of them
    oa, la = sparse_attention(
        q[:, skip:],
        ka,
        va,
        causal=True,
        window=window,
        softmax_scale=scaling,
        key_padding_mask=None if kpm is None else kpm[:, g:],
        q_offset=first_q + skip - rec_pos0,
        kv_offset=rec_pos0,
        softcap=softcap,
        return_lse=True,
    )
    if skip:
        oa = torch.cat([torch.zeros_like(q[:, :skip, :1]).expand(-1, -1, oa.shape[2], -1), oa], 1)
        la = torch.cat([torch.full_like(la[:, :, :1], float("-inf")).expand(-1, -1, skip), la], 2)
    if g == 0:
        return oa, None
    # (B) global keys at positions [0, g), seen from min(p, window) when capping the distance
    qb = q
    if cap:
        p = torch.arange(first_q, last + 1, device=q.device)
        delta = torch.clamp(p, max=window) - p
        if bool((delta != 0).any()):
            qb = _turn(q, delta, _inv_freq(module, q.device))
    ob, lb = sparse_attention(
        qb,
        k[:, :g],
        v[:, :g],
        causal=True,
        softmax_scale=scaling,
        key_padding_mask=None if kpm is None else kpm[:, :g],
        q_offset=first_q,
        kv_offset=0,
        softcap=softcap,
        return_lse=True,
    )
    return _merge(oa, la, ob, lb), None


def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class LambdaLayer(DynamicLayer):
        """Keeps the first n_global tokens and the last window - 1 (memory O(n_global + window))."""

        def __init__(self, window: int, n_global: int):
            super().__init__()
            self.window, self.n_global = window, n_global
            self.cumulative_length = 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.cumulative_length += key_states.shape[-2]
            full_k = torch.cat([self.keys, key_states], dim=-2)
            full_v = torch.cat([self.values, value_states], dim=-2)
            keep = self.n_global + self.window - 1
            if full_k.shape[-2] > keep:
                g, r = self.n_global, self.window - 1
                self.keys = torch.cat(
                    [full_k[..., :g, :], full_k[..., full_k.shape[-2] - r :, :]], dim=-2
                )
                self.values = torch.cat(
                    [full_v[..., :g, :], full_v[..., full_v.shape[-2] - r :, :]], dim=-2
                )
            else:
                self.keys, self.values = full_k, full_v
            return full_k, full_v

        def get_seq_length(self) -> int:
            return self.cumulative_length

        def get_mask_sizes(self, query_length: int):
            return (self.keys.shape[-2] if self.is_initialized else 0) + query_length, 0

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            super().reset()
            self.cumulative_length = 0

    return LambdaLayer


def lambda_cache(model, window=None, n_global=None):
    """A KV cache for ``model.generate(..., past_key_values=lambda_cache(model))`` on a model
    patched with ``longtune.patch(model, attention="lambda", ...)``: per layer it keeps the first
    n_global tokens and the last window - 1, so memory stays O(n_global + window) however long
    generation goes. ``window`` / ``n_global`` default to the patch's."""
    from transformers.cache_utils import Cache

    cfg = base_model(model).config
    stored = getattr(cfg, "longtune_patch", None) or {}
    if stored.get("attention") != "lambda":
        raise ValueError(
            "lambda_cache: patch the model first with longtune.patch(model, attention='lambda', "
            "...)"
        )
    window = int(window or stored["window"])
    n_global = int(n_global if n_global is not None else stored["n_global"])
    layer = _layer_class()
    return Cache(layers=[layer(window, n_global) for _ in range(cfg.num_hidden_layers)])
