"""Shared cases of the sparse-attention tests (CPU kernel, emulated CUDA kernel, real GPU)."""

from __future__ import annotations

import torch

# (name, kwargs of longtune.sparse_attention / reference.sparse_attention)
MASKS = [
    ("causal", dict()),
    ("full", dict(causal=False)),
    ("s2", dict(s2_group_size=8)),
    ("s2_odd_tail", dict(s2_group_size=6)),
    ("s2_noncausal", dict(causal=False, s2_group_size=8)),
    ("s2_roll", dict(s2_group_size=8, s2_mode="longlora_roll")),
    ("window", dict(window=5)),
    ("lambda", dict(window=6, n_global=3)),
    ("window_lr", dict(causal=False, window=(4, 3))),
    ("s2_lambda", dict(s2_group_size=10, window=4, n_global=2)),
]

# (H_q, H_kv): MHA, GQA, MQA, SQA-style fewer query heads than a baseline, rSQA (H_kv > H_q)
HEADS = [(4, 4), (4, 2), (4, 1), (2, 4), (1, 2)]


def make_qkv(b, nq, nk, hq, hkv, d, dtype, device="cpu", packed=False, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape_q = (nq, hq, d) if packed else (b, nq, hq, d)
    shape_k = (nk, hkv, d) if packed else (b, nk, hkv, d)
    q = torch.randn(shape_q, generator=g, dtype=torch.float64)
    k = torch.randn(shape_k, generator=g, dtype=torch.float64)
    v = torch.randn(shape_k, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v)]
