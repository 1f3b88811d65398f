"""Sparse attention ops: ``torch.ops.longtune.sparse_attention_fwd/_bwd`` with fake kernels,
autograd,
FLOP formulas (unmasked pairs only), and the public ``sparse_attention`` function.

The semantics are those of :mod:`longtune.reference.attention` (the spec)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from .mask import AttentionMask

_FWD = torch.ops.longtune.sparse_attention_fwd
_BWD = torch.ops.longtune.sparse_attention_bwd
_RANGES = torch.ops.longtune.attention_mask_ranges


def mask_args(
    causal=True,
    s2_group_size=None,
    s2_mode="leakfree",
    window=None,
    n_global=0,
    q_offset=None,
    kv_offset=0,
    head_offset=0,
    total_heads=0,
    *,
    mask: Optional[AttentionMask] = None,
) -> AttentionMask:
    """The :class:`AttentionMask` of a call: ``mask`` itself, or built from the public keyword
    arguments (:meth:`AttentionMask.from_keywords`); both at once is an error."""
    if mask is not None:
        if not isinstance(mask, AttentionMask):
            raise TypeError(
                f"longtune.sparse_attention: mask must be a longtune.AttentionMask, got "
                f"{type(mask).__name__}"
            )
        keywords = (
            ("causal", causal, True),
            ("s2_group_size", s2_group_size, None),
            ("s2_mode", s2_mode, "leakfree"),
            ("window", window, None),
            ("n_global", n_global, 0),
            ("q_offset", q_offset, None),
            ("kv_offset", kv_offset, 0),
            ("head_offset", head_offset, 0),
            ("total_heads", total_heads, 0),
        )
        given = [
            name for name, value, default in keywords if value is not default and value != default
        ]
        if given:
            raise ValueError(
                f"longtune.sparse_attention: pass the mask either as mask=AttentionMask(...) or as "
                f"keywords, not both (got mask and {given})"
            )
        return mask
    return AttentionMask.from_keywords(
        causal,
        s2_group_size,
        s2_mode,
        window,
        n_global,
        q_offset,
        kv_offset,
        head_offset,
        total_heads,
    )


class _Fn:
    """Saved-tensor plumbing of the autograd registration."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, kpm, cu_q, cu_k, *rest = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, kpm, cu_q, cu_k)
        ctx.rest = rest
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, kpm, cu_q, cu_k = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = _BWD(grad_out.contiguous(), q, k, v, out, lse, kpm, cu_q, cu_k, *ctx.rest)
        return (dq, dk, dv) + (None,) * (3 + len(ctx.rest))


torch.library.register_autograd(
    "longtune::sparse_attention_fwd", _Fn.backward, setup_context=_Fn.setup_context
)


def _heads(q, k):
    return max(q.shape[-2], k.shape[-2])


@torch.library.register_fake("longtune::sparse_attention_fwd")
def _fake_fwd(q, k, v, kpm, cu_q, cu_k, max_q, max_k, scale, mask, softcap=0.0):
    for name, t in (
        ("k", k),
        ("v", v),
        ("key_padding_mask", kpm),
        ("cu_seqlens_q", cu_q),
        ("cu_seqlens_k", cu_k),
    ):
        torch._check(
            t is None or t.device == q.device,
            lambda name=name, t=t: (
                f"longtune.sparse_attention_fwd: q and {name} must be "
                f"on the same device, got {q.device} and {t.device}"
            ),
        )
    torch._check(
        q.shape[-1] == k.shape[-1],
        lambda: "longtune.sparse_attention_fwd: q and k must have the same head_dim",
    )
    h = _heads(q, k)
    ldt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cu_q is not None:
        return q.new_empty((q.shape[0], h, q.shape[-1])), q.new_empty((h, q.shape[0]), dtype=ldt)
    return (
        q.new_empty((q.shape[0], q.shape[1], h, q.shape[-1])),
        q.new_empty((q.shape[0], h, q.shape[1]), dtype=ldt),
    )


@torch.library.register_fake("longtune::sparse_attention_bwd")
def _fake_bwd(go, q, k, v, out, lse, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def count_pairs(
    nq: int,
    nk: int,
    heads: int,
    *,
    key_padding_mask=None,
    mask: Optional[AttentionMask] = None,
    **mask_kw,
) -> int:
    """Number of unmasked (query, key) pairs of one sequence summed over ``heads`` output heads
    (``key_padding_mask``: 1-D bool over the keys); the mask as ``mask=AttentionMask(...)`` or as
    ``sparse_attention``'s keywords. FLOPs: forward 4 * pairs * head_dim."""
    return _count_pairs(nq, nk, heads, mask_args(mask=mask, **mask_kw).to_list(), key_padding_mask)


def _count_pairs(nq, nk, heads, enc, key_padding_mask=None) -> int:
    if nq == 0 or nk == 0:
        return 0
    pre = None
    if key_padding_mask is not None:
        pre = torch.zeros(nk + 1, dtype=torch.long)
        pre[1:] = key_padding_mask.to("cpu", torch.long).cumsum(0)
    total = 0
    for h in range(heads):
        r = _RANGES(nq, nk, h, heads, enc)
        if pre is None:
            total += int((r[:, :, 1] - r[:, :, 0]).sum())
        else:
            total += int((pre[r[:, :, 1]] - pre[r[:, :, 0]]).sum())
    return total


def _pairs_of_call(q, k, kpm, cu_q, cu_k, enc):
    h = _heads(q, k)
    enc = list(enc)
    if cu_q is not None:
        cq, ck = cu_q.tolist(), cu_k.tolist()
        return sum(
            _count_pairs(cq[b + 1] - cq[b], ck[b + 1] - ck[b], h, enc) for b in range(len(cq) - 1)
        )
    return sum(
        _count_pairs(q.shape[1], k.shape[1], h, enc, None if kpm is None else kpm[b])
        for b in range(q.shape[0])
    )


# FLOPs: the GEMMs only (as flash-attention counts them); softcapping's tanh per score is not
# counted.
@register_flop_formula(torch.ops.longtune.sparse_attention_fwd, get_raw=True)
def _flops_fwd(
    q, k, v, kpm, cu_q, cu_k, max_q, max_k, scale, mask, *args, out_shape=None, **kwargs
) -> int:
    return 4 * q.shape[-1] * _pairs_of_call(q, k, kpm, cu_q, cu_k, mask)


@register_flop_formula(torch.ops.longtune.sparse_attention_bwd, get_raw=True)
def _flops_bwd(
    go,
    q,
    k,
    v,
    out,
    lse,
    kpm,
    cu_q,
    cu_k,
    max_q,
    max_k,
    scale,
    mask,
    *args,
    out_shape=None,
    **kwargs,
) -> int:
    return 10 * q.shape[-1] * _pairs_of_call(q, k, kpm, cu_q, cu_k, mask)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    s2_group_size: Optional[int] = None,
    s2_mode: str = "leakfree",
    window=None,
    n_global: int = 0,
    softmax_scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_k: Optional[int] = None,
    q_offset: Optional[int] = None,
    kv_offset: int = 0,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    mask: Optional[AttentionMask] = None,
):
    """Block-sparse flash attention (autograd-aware; CPU and CUDA kernels).

    q: (B, N_q, H_q, D), k/v: (B, N_k, H_kv, D); packed with ``cu_seqlens`` (B+1 offsets, int32/64):
    q (T_q, H_q, D), k/v (T_k, H_kv, D) (``cu_seqlens_k`` defaults to ``cu_seqlens``).
    Returns out (.., H, D) with H = max(H_q, H_kv) (and lse (B, H, N_q) / (H, T_q) float32 when
    ``return_lse``).

    - ``causal``: key j visible to query i only if j <= i (bottom-right aligned when N_q < N_k,
      or at ``q_offset``: query i sits at key position q_offset + i).
    - ``s2_group_size`` G: LongLoRA S^2-Attn -- attention inside groups of G; the second half of the
      heads is shifted by G/2. ``s2_mode="leakfree"`` (default) never lets a token see a later one;
      ``"longlora_roll"`` reproduces LongLoRA's torch.roll formulation bit for bit, including its
      last shifted group that wraps around and sees future tokens (only to reproduce models trained
      with it).
    - ``window``: int w (key visible iff i - j < w) or (left, right); ``n_global``: the first
      n_global keys stay visible outside the window (LM-Infinite's Lambda-mask).
    - ``key_padding_mask``: (B, N_k) bool, True = keep. A query that sees no key outputs 0.
    - ``kv_offset``: absolute position of key 0 (S^2 groups and global tokens are positions); may be
      negative (keys before the first query's position, e.g. a neighbouring shard's halo).
    - ``mask``: the whole mask as one :class:`longtune.AttentionMask` (also the only way to give
      ``head_offset`` / ``total_heads``), instead of the mask keywords above.
    - ``softcap``: logit softcapping (Gemma-2's ``attn_logit_softcapping``, flash-attention's
      ``softcap``): every score s = softmax_scale * q.k becomes softcap * tanh(s / softcap) before
      the mask and the softmax; gradients flow through the tanh. None or 0: off.
    """
    enc = mask_args(
        causal, s2_group_size, s2_mode, window, n_global, q_offset, kv_offset, mask=mask
    ).to_list()
    cap = 0.0 if softcap is None else float(softcap)
    if not (math.isfinite(cap) and cap >= 0.0):
        raise ValueError(
            f"longtune.sparse_attention: softcap must be a finite number > 0 (or None / 0 for no "
            f"capping), got {softcap!r}"
        )
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cu_k = cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens
    mq = int(max_seqlen) if max_seqlen is not None else 0
    mk = int(max_seqlen_k) if max_seqlen_k is not None else mq
    out, lse = _FWD(q, k, v, key_padding_mask, cu_seqlens, cu_k, mq, mk, scale, enc, cap)
    return (out, lse) if return_lse else out
