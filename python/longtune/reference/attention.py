"""Pure-PyTorch reference of the sparse-attention family: the executable spec of
``torch.ops.longtune.sparse_attention_fwd/_bwd`` (dense scores, an explicit boolean mask).

Layout ``(batch, seqlen, heads, head_dim)``; q has H_q heads, k/v have H_kv heads.

Head map (``head_map``): the attention runs over H = max(H_q, H_kv) "output heads" e.
 - H_q % H_kv == 0 (MHA, GQA, MQA, SQA, sSQA, xSQA, xSMQA): e reads query head e and kv head
   e // (H_q / H_kv).
 - H_kv % H_q == 0 with H_kv > H_q (rSQA): as in the SQA authors' code (RxAI-dev/RxNN,
   ``SparseQueryAttention._calculate_attention``: ``q.repeat(1, H_kv // H_q, 1, 1)``), the query
   heads are tiled: e reads query head e % H_q and kv head e; the output has H_kv heads.

Mask (``attention_mask``): positions pq = q_pos0 + i, pk = kv_offset + j with
q_pos0 = kv_offset + (nk - nq if q_offset is None else q_offset) (bottom-right alignment by default,
so a query chunk attends to a longer KV; kv_offset may be negative: keys before position 0, e.g. the
halo rows of a neighbouring shard). Key j is visible to query i iff all of:
 - causal: pk <= pq;
 - window (left, right) (an int w means (w, None)): pq - pk < left unless 0 <= pk < n_global
   (LM-Infinite Lambda-mask: the global tokens, positions [0, n_global), are always in view), and
   pk - pq < right;
 - S^2 groups of size G (``s2_group_size``): output heads e >= H // 2 are "shifted" by s = G // 2
   (a call holding heads [head_offset, head_offset + H) of ``total_heads``: the global heads
   head_offset + e >= total_heads // 2).
   ``"leakfree"``: group(p) = floor((p + s) / G), q and k must share a group (so shifted groups are
   [0, G/2), [G/2, 3G/2), ..., the last one partial). ``"longlora_roll"`` (LongLoRA's torch.roll
   formulation, nq == nk == N, no offsets): rolled index r(p) = (p - s) mod N, groups of G over r,
   and causality compares r(pk) <= r(pq) -- the last shifted group wraps around, [N - s, N) u
   [0, s), which lets tokens [0, s) see the future tokens [N - s, N);
 - key padding (``key_padding_mask`` (B, N_k) bool, True = keep).
Logit softcapping (``softcap`` c > 0, Gemma-2 / flash-attention): the scores s = softmax_scale * q.k
become c * tanh(s / c) before the mask and the softmax (autograd differentiates through the tanh).
A query that sees no key gets output 0 and lse = -inf (its gradient is 0).

Non-finite inputs: a masked pair (i, j) is never read - in the forward and in every gradient - so
a NaN / inf in a key, value or query row reaches exactly the rows (and gradients) that see it. A
row that reads a NaN score (a NaN in its q row, or in a visible key), or a +inf score (inf - inf
in the softmax), has output and lse NaN (lse +inf for +inf, as ``torch.logsumexp``); a NaN / inf in
v at a visible key makes the output non-finite. (A dense matmul would let masked pairs through:
0 * NaN = NaN; the reference switches to a pairwise formulation when an input is non-finite.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

S2_MODES = ("leakfree", "longlora_roll")


def head_map(h_q: int, h_kv: int):
    """(number of output heads H, q head of e, kv head of e) as two lists."""
    if h_q % h_kv == 0:
        r = h_q // h_kv
        return h_q, list(range(h_q)), [e // r for e in range(h_q)]
    if h_kv % h_q == 0:
        return h_kv, [e % h_q for e in range(h_kv)], list(range(h_kv))
    raise ValueError(f"heads: H_q={h_q} and H_kv={h_kv} must divide one another")


def _norm_window(window):
    if window is None:
        return None, None
    if isinstance(window, int):
        return window, None
    left, right = window
    return left, right


def attention_mask(
    nq: int,
    nk: int,
    *,
    shifted: bool = False,
    causal: bool = True,
    s2_group_size=None,
    s2_mode: str = "leakfree",
    window=None,
    n_global: int = 0,
    q_offset=None,
    kv_offset: int = 0,
    device=None,
) -> torch.Tensor:
    """Boolean (nq, nk) mask of one sequence and one output head (``shifted``: the head is in the
    second half). True = visible."""
    left, right = _norm_window(window)
    q_pos0 = kv_offset + (nk - nq if q_offset is None else q_offset)
    pq = (q_pos0 + torch.arange(nq, device=device)).view(-1, 1)
    pk = (kv_offset + torch.arange(nk, device=device)).view(1, -1)
    m = torch.ones(nq, nk, dtype=torch.bool, device=device)
    roll = s2_group_size and s2_mode == "longlora_roll" and shifted
    if causal and not roll:
        m &= pk <= pq
    if left is not None:
        m &= ((pq - pk) < left) | ((pk >= 0) & (pk < n_global))
    if right is not None:
        m &= (pk - pq) < right
    if s2_group_size:
        g = s2_group_size
        s = g // 2 if shifted else 0
        if roll:
            n = nk
            rq, rk = (pq - s) % n, (pk - s) % n
            m &= torch.div(rq, g, rounding_mode="floor") == torch.div(rk, g, rounding_mode="floor")
            if causal:
                m &= rk <= rq
        else:
            m &= torch.div(pq + s, g, rounding_mode="floor") == torch.div(
                pk + s, g, rounding_mode="floor"
            )
    return m


def _softcap(s, softcap):
    return s if not softcap else softcap * torch.tanh(s / softcap)


def _dense_pairwise(q, k, v, mask, scale, softcap=None):
    """``_dense`` for non-finite inputs: every product of a masked pair is formed from zeros (the
    inputs are masked before they are multiplied), so neither the output nor any gradient of a
    row reads a key it does not see, and no key's gradient reads a row that does not see it."""
    m4 = mask.unsqueeze(-1)  # (H, nq, nk, 1)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    qm = torch.where(m4, q.permute(1, 0, 2).unsqueeze(2), zero)  # (H, nq, nk, D)
    km = torch.where(m4, k.permute(1, 0, 2).unsqueeze(1), zero)
    vm = torch.where(m4, v.permute(1, 0, 2).unsqueeze(1), zero)
    s = _softcap((qm * km).sum(-1) * scale, softcap)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (H, nq)
    p = torch.exp(
        s - torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse).unsqueeze(-1)
    )
    p = torch.where(mask, p, torch.zeros_like(p))
    o = (p.unsqueeze(-1) * vm).sum(-2).permute(1, 0, 2)  # (nq, H, D)
    return o, lse


def _dense(q, k, v, mask, scale, softcap=None):
    """One sequence: q (nq, H, D) etc. already head-mapped (same H); mask (H, nq, nk)."""
    if not (torch.isfinite(q).all() and torch.isfinite(k).all() and torch.isfinite(v).all()):
        return _dense_pairwise(q, k, v, mask, scale, softcap)
    s = _softcap(torch.einsum("ihd,jhd->hij", q, k) * scale, softcap)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (H, nq)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    p = torch.where(mask, p, torch.zeros_like(p))
    o = torch.einsum("hij,jhd->ihd", p, v)
    return o, lse


def sparse_attention(
    q,
    k,
    v,
    *,
    causal=True,
    s2_group_size=None,
    s2_mode="leakfree",
    window=None,
    n_global=0,
    softmax_scale=None,
    key_padding_mask=None,
    cu_seqlens=None,
    cu_seqlens_k=None,
    q_offset=None,
    kv_offset=0,
    softcap=None,
    return_lse=False,
    head_offset=0,
    total_heads=None,
):
    """Dense reference. Batched: q (B, N_q, H_q, D), k/v (B, N_k, H_kv, D) -> out (B, N_q, H, D),
    lse (B, H, N_q). Packed (``cu_seqlens``): q (T_q, H_q, D), k/v (T_k, H_kv, D) -> out (T_q, H,
    D), lse (H, T_q). Computed in q's dtype (pass float64 tensors for the exact reference).
    ``head_offset`` / ``total_heads`` (None: H): the call's heads are [head_offset, head_offset + H)
    of total_heads, which decides the S^2-shifted ones."""
    if s2_mode not in S2_MODES:
        raise ValueError(f"s2_mode must be one of {S2_MODES}, got {s2_mode!r}")
    h, qh, kh = head_map(q.shape[-2], k.shape[-2])
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    total = h if total_heads is None else total_heads
    if not 0 <= head_offset <= total - h:
        raise ValueError(
            f"heads [head_offset, head_offset + H) = [{head_offset}, {head_offset + h}) must lie "
            f"within total_heads={total}"
        )
    qi = torch.tensor(qh, device=q.device)
    ki = torch.tensor(kh, device=q.device)

    def one(qs, ks, vs, kpm):
        nq, nk = qs.shape[0], ks.shape[0]
        masks = [
            attention_mask(
                nq,
                nk,
                shifted=(head_offset + e >= total // 2),
                causal=causal,
                s2_group_size=s2_group_size,
                s2_mode=s2_mode,
                window=window,
                n_global=n_global,
                q_offset=q_offset,
                kv_offset=kv_offset,
                device=q.device,
            )
            for e in range(h)
        ]
        mask = torch.stack(masks)
        if kpm is not None:
            mask = mask & kpm.view(1, 1, -1)
        return _dense(
            qs.index_select(1, qi),
            ks.index_select(1, ki),
            vs.index_select(1, ki),
            mask,
            scale,
            softcap,
        )

    if cu_seqlens is not None:
        cq = [int(x) for x in cu_seqlens]
        ck = [int(x) for x in (cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens)]
        outs, lses = [], []
        for b in range(len(cq) - 1):
            o, l = one(q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]], None)
            outs.append(o)
            lses.append(l)
        out, lse = torch.cat(outs, 0), torch.cat(lses, 1)
    else:
        outs, lses = [], []
        for b in range(q.shape[0]):
            o, l = one(q[b], k[b], v[b], None if key_padding_mask is None else key_padding_mask[b])
            outs.append(o)
            lses.append(l)
        out, lse = torch.stack(outs), torch.stack(lses)
    return (out, lse.float() if lse.dtype != torch.float64 else lse) if return_lse else out


def longlora_roll_attention(q, k, v, group_size: int, softmax_scale=None):
    """A direct transcription of LongLoRA's ``forward_noflashattn`` shift (llama_attn_replace.py):
    roll the second half of the heads by -G/2, cut the sequence into groups of G, causal softmax
    attention inside each group, roll the output back. Needs N % G == 0 and H_q == H_kv.
    q, k, v: (B, N, H, D)."""
    b, n, h, d = q.shape
    g = group_size
    assert n % g == 0, "LongLoRA's formulation needs N to be a multiple of the group size"
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)

    def shift(t):
        t = t.transpose(1, 2).clone()  # (B, H, N, D) as in LongLoRA
        t[:, h // 2 :] = t[:, h // 2 :].roll(-g // 2, dims=2)
        return t.transpose(1, 2).reshape(b * (n // g), g, h, d).transpose(1, 2)

    qs, ks, vs = shift(q), shift(k), shift(v)
    w = torch.matmul(qs, ks.transpose(2, 3)) * scale
    causal = torch.full((g, g), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    w = torch.softmax(w + causal, dim=-1)
    o = torch.matmul(w, vs).transpose(1, 2).reshape(b, n, h, d).clone()
    o[:, :, h // 2 :] = o[:, :, h // 2 :].roll(g // 2, dims=1)
    return o


def longlora_s2_sdpa(q, k, v, group_size: int):
    """LongLoRA's S^2-Attn as its users run it (the benchmark baseline): roll half the heads,
    reshape into groups, causal ``scaled_dot_product_attention`` per group, roll back. (B, N, H,
    D)."""
    b, n, h, d = q.shape
    g = group_size
    hh = h // 2

    def shift(t):
        t = torch.cat([t[:, :, :hh], t[:, :, hh:].roll(-g // 2, dims=1)], dim=2)
        return t.reshape(b * (n // g), g, h, d).transpose(1, 2)

    o = F.scaled_dot_product_attention(shift(q), shift(k), shift(v), is_causal=True)
    o = o.transpose(1, 2).reshape(b, n, h, d)
    return torch.cat([o[:, :, :hh], o[:, :, hh:].roll(g // 2, dims=1)], dim=2)
