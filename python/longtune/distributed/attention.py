"""Sequence-parallel S^2-Attn (and full causal attention): every rank holds a contiguous shard
of the sequence (rank r: tokens [r * L, (r + 1) * L) of N = W * L) and computes exactly its rows
of the single-process ``longtune.sparse_attention(q, k, v, s2_group_size=G, s2_mode=...)``, with
gradients.

Three strategies (:func:`s2_attention_sp`, ``mode``):

- ``"halo"``: S^2 attention only looks back to the start of a token's group, so a shard needs at
  most the last rows of its predecessor. Rank r needs ``(r * L) % G`` rows before its first token
  for the unshifted heads and ``(r * L + G / 2) % G`` rows for the shifted ones (``longlora_roll``:
  rank 0 also needs the last G / 2 rows of rank W - 1 for the shifted heads, the group that wraps
  around). Halo mode applies when every such count is at most L (so the rows come from the
  predecessor alone; always true when G <= L + 1) and, for ``longlora_roll``, N % G == 0. With
  L % G == 0 the unshifted heads need nothing and the shifted heads G / 2 rows of their kv heads.
  The exchange is posted first and the heads that need no halo are computed while it is in flight.
  In ``longlora_roll`` the wrapped group [N - G/2, N) u [0, G/2) is rank 0's first shifted group
  with the received rows placed before position 0 (kv_offset = -G/2): ordered by the rolled index
  they precede tokens [0, G/2), and no other token of the wrapped group reads across the wrap.
- ``"ulysses"``: all-to-all from sequence shards to head shards (each rank gets all N tokens of
  H / W output heads), the unchanged kernel with ``head_offset`` / ``total_heads`` (which global
  heads are shifted), all-to-all back. Needs H % W == 0 (H = max(H_q, H_kv)); any G and N.
- ``"ring"`` (full causal attention, ``s2_group_size=None``): the K / V blocks travel around the
  ring, partial results merged by their log-sum-exp (:class:`_RingAttention`).

The head map of GQA / MQA / SQA is kept: each call gets the q and kv heads its output heads read,
compactly when they form a head map of their own (e.g. whole GQA groups, or one shared kv head) and
otherwise with the kv heads repeated per output head (their gradients are summed back).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from ..ops.attention import sparse_attention
from ..ops.mask import AttentionMask
from ..reference.attention import S2_MODES, head_map
from .comm import (
    HeadsToSeq,
    RingExchange,
    SeqToHeads,
    as_timedelta,
    group_rank_size,
)

SP_MODES = ("auto", "halo", "ulysses", "ring")


# ------------------------------------------------------------------ planning
def halo_rows(seq_len: int, world_size: int, s2_group_size: int, s2_mode: str = "leakfree"):
    """(unshifted, shifted): per rank, how many rows before its first token its heads read (they
    lie on the previous rank; for ``longlora_roll`` rank 0's shifted rows are the last rows of
    rank W - 1)."""
    g, s, n_loc = s2_group_size, s2_group_size // 2, seq_len // world_size
    unshifted = tuple((r * n_loc) % g for r in range(world_size))
    shifted = tuple(
        (r * n_loc + s) % g if r else (s if s2_mode == "longlora_roll" else 0)
        for r in range(world_size)
    )
    return unshifted, shifted


def _halo_problem(seq_len, world_size, g, s2_mode) -> Optional[str]:
    n_loc = seq_len // world_size
    if s2_mode == "longlora_roll" and seq_len % g:
        return (
            f"s2_mode='longlora_roll' needs the sequence length to be a multiple of s2_group_size "
            f"in halo mode (got N={seq_len}, G={g})"
        )
    for which, rows in zip(("unshifted", "shifted"), halo_rows(seq_len, world_size, g, s2_mode)):
        for r, h in enumerate(rows):
            if h > n_loc:
                return (
                    f"rank {r} needs {h} rows before its first token for the {which} heads but a "
                    f"shard holds L={n_loc} (N={seq_len}, W={world_size}, G={g}); halo mode needs "
                    f"every such count <= L (e.g. G <= L + 1)"
                )
    return None


def _ulysses_problem(heads, world_size) -> Optional[str]:
    if heads % world_size:
        return (
            f"ulysses mode needs the number of heads H = max(H_q, H_kv) = {heads} to be a multiple "
            f"of the world size {world_size}"
        )
    return None


def sp_mode(
    seq_len: int,
    world_size: int,
    heads: int,
    s2_group_size: Optional[int],
    s2_mode: str = "leakfree",
    mode: str = "auto",
) -> str:
    """The strategy :func:`s2_attention_sp` uses for a global sequence of ``seq_len`` tokens on
    ``world_size`` ranks with ``heads`` output heads: ``"halo"``, ``"ulysses"`` or ``"ring"``.
    ``"auto"``: with S^2 halo mode, else Ulysses; without S^2 (``s2_group_size=None``, full causal
    attention) Ulysses, else ring. Raises ValueError when the asked mode cannot run."""
    _check_config(s2_group_size, s2_mode, mode)
    if seq_len % world_size:
        raise ValueError(
            f"longtune.distributed: the sequence length {seq_len} must be a multiple of the world "
            f"size {world_size}"
        )
    uly = _ulysses_problem(heads, world_size)
    if s2_group_size is None:
        if mode == "halo":
            raise ValueError(
                "longtune.distributed.s2_attention_sp: mode='halo' needs S^2 groups "
                "(s2_group_size); full causal attention runs in 'ring' or 'ulysses' mode"
            )
        if mode == "ulysses" and uly:
            raise ValueError(f"longtune.distributed.s2_attention_sp: {uly}")
        if mode == "auto":
            return "ring" if uly else "ulysses"
        return mode
    if mode == "ring":
        raise ValueError(
            "longtune.distributed.s2_attention_sp: mode='ring' is full causal attention "
            "(s2_group_size=None); S^2 attention runs in 'halo' or 'ulysses' mode"
        )
    halo = _halo_problem(seq_len, world_size, s2_group_size, s2_mode)
    if mode == "halo" and halo:
        raise ValueError(f"longtune.distributed.s2_attention_sp: mode='halo': {halo}")
    if mode == "ulysses" and uly:
        raise ValueError(f"longtune.distributed.s2_attention_sp: {uly}")
    if mode == "auto":
        if halo and uly:
            raise ValueError(
                f"longtune.distributed.s2_attention_sp: no mode applies: halo: {halo}; {uly}"
            )
        return "ulysses" if halo else "halo"
    return mode


def _check_config(g, s2_mode, mode):
    if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2):
        raise ValueError(
            f"longtune.distributed.s2_attention_sp: s2_group_size must be an even int >= 2 (or "
            f"None: full causal attention), got {g!r}"
        )
    if s2_mode not in S2_MODES:
        raise ValueError(
            f"longtune.distributed.s2_attention_sp: s2_mode must be one of {S2_MODES}, got "
            f"{s2_mode!r}"
        )
    if mode not in SP_MODES:
        raise ValueError(
            f"longtune.distributed.s2_attention_sp: mode must be one of {SP_MODES}, got {mode!r}"
        )


def head_split(h_q: int, h_kv: int, first: int, stop: int):
    """(q heads, kv heads) to give a kernel call whose output heads are exactly the output heads
    [first, stop) of the (h_q, h_kv) head map: the distinct heads when they form a head map of
    their own that reproduces the slice, else one q and one kv head per output head."""
    _, qh, kh = head_map(h_q, h_kv)
    qs, ks = qh[first:stop], kh[first:stop]
    uq, uk = sorted(set(qs)), sorted(set(ks))
    try:
        h2, qh2, kh2 = head_map(len(uq), len(uk))
    except ValueError:
        h2 = None
    if h2 == stop - first and all(
        uq[qh2[e]] == qs[e] and uk[kh2[e]] == ks[e] for e in range(stop - first)
    ):
        return uq, uk
    return qs, ks


# ------------------------------------------------------------------ halo mode
@dataclasses.dataclass
class _Half:
    first: int  # output heads [first, stop)
    stop: int
    qi: torch.Tensor
    ki: torch.Tensor
    rows: tuple  # halo rows per rank; all zero: no exchange


@dataclasses.dataclass
class _HaloCfg:
    group: object
    rank: int
    world: int
    g: int
    heads: int
    scale: float
    timeout: object
    halves: list


def _mask(cfg: _HaloCfg, half: _Half, n_loc: int, h: int) -> list:
    return AttentionMask(
        causal=True,
        s2_group_size=cfg.g,
        s2_mode="leakfree",
        q_offset=h,
        kv_offset=cfg.rank * n_loc - h,
        head_offset=half.first,
        total_heads=cfg.heads,
    ).to_list()


def _fwd(q, k, v, scale, enc):
    return torch.ops.longtune.sparse_attention_fwd(q, k, v, None, None, None, 0, 0, scale, enc, 0.0)


def _bwd(go, q, k, v, out, lse, scale, enc):
    return torch.ops.longtune.sparse_attention_bwd(
        go, q, k, v, out, lse, None, None, None, 0, 0, scale, enc, 0.0
    )


class _HaloS2Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg: _HaloCfg):
        b, n_loc, _, d = q.shape
        r, w = cfg.rank, cfg.world
        ex, sub = {}, {}
        for i, half in enumerate(cfg.halves):
            ks, vs = k.index_select(2, half.ki), v.index_select(2, half.ki)
            sub[i] = (q.index_select(2, half.qi), ks, vs)
            if any(half.rows):
                h_send, h_recv = half.rows[(r + 1) % w], half.rows[r]
                shape = (b, h_recv, ks.shape[2], d)
                ex[i] = RingExchange(
                    [ks[:, n_loc - h_send :], vs[:, n_loc - h_send :]],
                    [shape, shape],
                    group=cfg.group,
                    rank=r,
                    world=w,
                    op="halo",
                    timeout=cfg.timeout,
                    tag=i,
                )
        saved = {}
        # the heads without a halo first, while the exchange is in flight
        for i in sorted(sub, key=lambda i: i in ex):
            qs, ks, vs = sub[i]
            h = 0
            if i in ex:
                hk, hv = ex[i].wait()
                h = hk.shape[1]
                ks, vs = torch.cat([hk, ks], 1), torch.cat([hv, vs], 1)
            enc = _mask(cfg, cfg.halves[i], n_loc, h)
            out, lse = _fwd(qs, ks, vs, cfg.scale, enc)
            saved[i] = (qs, ks, vs, out, lse, enc, h)
        ctx.cfg, ctx.saved = cfg, saved
        ctx.shapes = (q.shape, k.shape, v.shape)
        return torch.cat([saved[i][3] for i in range(len(cfg.halves))], 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        cfg, saved = ctx.cfg, ctx.saved
        r, w = cfg.rank, cfg.world
        qshape, kshape, vshape = ctx.shapes
        n_loc = qshape[1]
        dq = grad_out.new_zeros(qshape)
        dk = grad_out.new_zeros(kshape)
        dv = grad_out.new_zeros(vshape)
        pending = []
        # the heads with a halo first: their halo-row gradients travel back while the others run
        for i in sorted(saved, key=lambda i: not any(cfg.halves[i].rows)):
            half = cfg.halves[i]
            qs, ks, vs, out, lse, enc, h = saved[i]
            go = grad_out[:, :, half.first : half.stop].contiguous()
            dqs, dks, dvs = _bwd(go, qs, ks, vs, out, lse, cfg.scale, enc)
            dq.index_add_(2, half.qi, dqs)
            if any(half.rows):
                h_back = half.rows[(r + 1) % w]  # rows this rank sent forward
                shape = (dks.shape[0], h_back, dks.shape[2], dks.shape[3])
                back = RingExchange(
                    [dks[:, :h], dvs[:, :h]],
                    [shape, shape],
                    group=cfg.group,
                    rank=r,
                    world=w,
                    op="halo_grad",
                    timeout=cfg.timeout,
                    reverse=True,
                    tag=2 + i,
                )
                pending.append((half, dks[:, h:], dvs[:, h:], back, h_back))
            else:
                dk.index_add_(2, half.ki, dks)
                dv.index_add_(2, half.ki, dvs)
        for half, dks, dvs, back, h_back in pending:
            gk, gv = back.wait()
            dks, dvs = dks.clone(), dvs.clone()
            dks[:, n_loc - h_back :] += gk
            dvs[:, n_loc - h_back :] += gv
            dk.index_add_(2, half.ki, dks)
            dv.index_add_(2, half.ki, dvs)
        return dq, dk, dv, None


def _halo(q, k, v, g, s2_mode, scale, group, rank, world, timeout):
    h_q, h_kv = q.shape[2], k.shape[2]
    heads = max(h_q, h_kv)
    unshifted, shifted = halo_rows(q.shape[1] * world, world, g, s2_mode)
    halves = []
    for first, stop, rows in ((0, heads // 2, unshifted), (heads // 2, heads, shifted)):
        if first == stop:
            continue
        qi, ki = head_split(h_q, h_kv, first, stop)
        dev = q.device
        halves.append(
            _Half(
                first,
                stop,
                torch.tensor(qi, dtype=torch.long, device=dev),
                torch.tensor(ki, dtype=torch.long, device=dev),
                rows,
            )
        )
    cfg = _HaloCfg(group, rank, world, g, heads, scale, timeout, halves)
    return _HaloS2Attention.apply(q, k, v, cfg)


# ------------------------------------------------------------------ Ulysses mode
def _ulysses(q, k, v, g, s2_mode, scale, group, rank, world, timeout):
    h_q, h_kv = q.shape[2], k.shape[2]
    heads = max(h_q, h_kv)
    hw = heads // world
    splits = [head_split(h_q, h_kv, w * hw, (w + 1) * hw) for w in range(world)]
    if len({(len(a), len(b)) for a, b in splits}) > 1:
        _, qh, kh = head_map(h_q, h_kv)
        splits = [(qh[w * hw : (w + 1) * hw], kh[w * hw : (w + 1) * hw]) for w in range(world)]
    qi = torch.tensor([i for a, _ in splits for i in a], dtype=torch.long, device=q.device)
    ki = torch.tensor([i for _, b in splits for i in b], dtype=torch.long, device=q.device)
    comm = (group, rank, world, timeout)
    qh_ = SeqToHeads.apply(q.index_select(2, qi), *comm)
    kh_ = SeqToHeads.apply(k.index_select(2, ki), *comm)
    vh_ = SeqToHeads.apply(v.index_select(2, ki), *comm)
    mask = AttentionMask(
        causal=True,
        s2_group_size=g or 0,
        s2_mode=s2_mode if g else None,
        head_offset=rank * hw,
        total_heads=heads,
    )
    out = sparse_attention(qh_, kh_, vh_, softmax_scale=scale, mask=mask)
    return HeadsToSeq.apply(out, *comm)


# ------------------------------------------------------------------ ring mode
_CAUSAL = AttentionMask(causal=True).to_list()
_FULL = AttentionMask(causal=False).to_list()


def _merge(out, lse, out_j, lse_j):
    """Softmax-merges two partial attentions over disjoint key sets: out (B, L, H, D) with lse
    (B, H, L)."""
    new = torch.logaddexp(lse, lse_j)
    a = torch.exp(lse - new).transpose(1, 2).unsqueeze(-1)
    b = torch.exp(lse_j - new).transpose(1, 2).unsqueeze(-1)
    return out * a.to(out.dtype) + out_j * b.to(out.dtype), new


class _RingAttention(torch.autograd.Function):
    """Full causal attention on sequence shards: the K / V blocks travel around the ring (rank r
    reads the blocks of ranks 0..r: its own with the causal mask, the earlier ones whole), the
    partial results are merged by their log-sum-exp. The backward passes the blocks around again,
    recomputes each block's partial softmax and differentiates the merge (see ``backward``); the
    K / V gradient accumulators travel with the blocks and reach their owners after W steps."""

    @staticmethod
    def forward(ctx, q, k, v, group, rank, world, scale, timeout):
        comm = dict(group=group, rank=rank, world=world, timeout=timeout)
        kc, vc = k.contiguous(), v.contiguous()
        out = lse = None
        for step in range(world):
            j = (rank - step) % world  # the block held now came from rank j
            ex = None
            if step < world - 1:
                ex = RingExchange([kc, vc], [kc.shape, vc.shape], op="ring", tag=0, **comm)
            if j <= rank:
                enc = _CAUSAL if j == rank else _FULL
                out_j, lse_j = _fwd(q, kc, vc, scale, enc)
                if out is None:
                    out, lse = out_j.to(lse_j.dtype), lse_j
                else:
                    out, lse = _merge(out, lse, out_j.to(lse_j.dtype), lse_j)
            if ex is not None:
                kc, vc = ex.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, rank, world, scale, timeout)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        # Each block's kernel backward runs on its own softmax (recomputed out_j, lse_j) with
        # grad w_j * dO, w_j = exp(lse_j - lse); the merge's dependence on lse_j adds
        # dS = g * P_j with g = w_j * rowsum(dO * (out_j - out)): dq += scale * g * (P_j K_j)
        # (a forward with the keys as values) and dk += scale * P_j^T (g * q) (the dv of a
        # backward). Every call is self-consistent, whatever form of the softmax backward the
        # kernel uses.
        q, k, v, out, lse = ctx.saved_tensors
        group, rank, world, scale, timeout = ctx.args
        comm = dict(group=group, rank=rank, world=world, timeout=timeout)
        ct = lse.dtype
        go = grad_out.contiguous().to(ct)
        out_c = out.to(ct)
        kc, vc = k.contiguous(), v.contiguous()
        dq = torch.zeros(q.shape, dtype=ct, device=q.device)
        dk = torch.zeros(k.shape, dtype=ct, device=k.device)  # the held block's accumulators
        dv = torch.zeros(v.shape, dtype=ct, device=v.device)
        for step in range(world):
            j = (rank - step) % world
            ex = None
            if step < world - 1:
                ex = RingExchange([kc, vc], [kc.shape, vc.shape], op="ring", tag=0, **comm)
            if j <= rank:
                enc = _CAUSAL if j == rank else _FULL
                out_j, lse_j = _fwd(q, kc, vc, scale, enc)
                w = torch.exp(lse_j - lse).transpose(1, 2).unsqueeze(-1)  # (B, L, H, 1)
                g = w * (go * (out_j.to(ct) - out_c)).sum(-1, keepdim=True)
                dq_j, dk_j, dv_j = _bwd((w * go).to(q.dtype), q, kc, vc, out_j, lse_j, scale, enc)
                pk, _ = _fwd(q, kc, kc, scale, enc)  # P_j K_j / rowsum(P_j)
                _, _, dk_g = _bwd((g * q.to(ct)).to(q.dtype), q, kc, vc, out_j, lse_j, scale, enc)
                dq += dq_j.to(ct) + scale * g * pk.to(ct)
                dk += dk_j.to(ct) + scale * dk_g.to(ct)
                dv += dv_j.to(ct)
            acc = RingExchange([dk, dv], [dk.shape, dv.shape], op="ring_grad", tag=1, **comm)
            if ex is not None:
                kc, vc = ex.wait()
            dk, dv = acc.wait()  # after the last step: this rank's own block, all contributions
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _ring(q, k, v, g, s2_mode, scale, group, rank, world, timeout):
    return _RingAttention.apply(q, k, v, group, rank, world, scale, timeout)


# ------------------------------------------------------------------ public entry
def s2_attention_sp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    s2_group_size: Optional[int],
    s2_mode: str = "leakfree",
    mode: str = "auto",
    softmax_scale: Optional[float] = None,
    group=None,
    timeout=None,
) -> torch.Tensor:
    """Sequence-parallel causal S^2-Attn (autograd-aware).

    q: (B, L, H_q, D), k / v: (B, L, H_kv, D): this rank's shard, tokens [r * L, (r + 1) * L) of
    a sequence of N = W * L tokens split over the W ranks of ``group`` (None: the default group; a
    ProcessGroup or a 1-D DeviceMesh; every rank passes the same shapes). Returns (B, L, H, D),
    H = max(H_q, H_kv): exactly this rank's rows of ``longtune.sparse_attention(q_full, k_full,
    v_full, s2_group_size=G, s2_mode=s2_mode, softmax_scale=softmax_scale)``; the backward
    returns this rank's rows of the q / k / v gradients (the gradients of rows another rank read
    are sent back and summed here).

    - ``s2_group_size`` G (even), ``s2_mode``: ``"leakfree"`` or ``"longlora_roll"``, as in
      ``sparse_attention``; ``s2_group_size=None``: full causal attention (no S^2).
    - ``mode``: ``"halo"`` (S^2: neighbour exchange of the rows the groups need), ``"ulysses"``
      (all-to-all to head shards and back), ``"ring"`` (full causal: K / V blocks around the
      ring, partial results merged by log-sum-exp) or ``"auto"`` (S^2: halo when its conditions
      hold, else ulysses; full causal: ulysses when H % W == 0, else ring); :func:`sp_mode` tells
      which, and why a mode cannot run.
    - ``timeout``: seconds (or a timedelta) each communication may take (default 300); past it a
      :class:`~longtune.distributed.CommTimeoutError` names the rank and the operation.
    """
    group, rank, world = group_rank_size(group, "s2_attention_sp")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"longtune.distributed.s2_attention_sp: {name} must be a 4-D tensor (B, L, heads, "
                f"head_dim), got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
    if k.shape != v.shape:
        raise ValueError(
            f"longtune.distributed.s2_attention_sp: k and v must have the same shape, got "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"longtune.distributed.s2_attention_sp: q {tuple(q.shape)} and k {tuple(k.shape)} "
            f"must agree in batch, local length and head_dim"
        )
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        raise ValueError(
            "longtune.distributed.s2_attention_sp: q, k and v must share dtype and device"
        )
    try:
        heads, _, _ = head_map(q.shape[2], k.shape[2])
    except ValueError as e:
        raise ValueError(f"longtune.distributed.s2_attention_sp: {e}") from None
    _check_config(s2_group_size, s2_mode, mode)
    timeout = as_timedelta(timeout)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if world == 1:
        if s2_group_size is None:
            return sparse_attention(q, k, v, softmax_scale=scale)
        return sparse_attention(
            q, k, v, s2_group_size=s2_group_size, s2_mode=s2_mode, softmax_scale=scale
        )
    chosen = sp_mode(q.shape[1] * world, world, heads, s2_group_size, s2_mode, mode)
    if chosen == "ring" and q.shape[2] % k.shape[2]:
        raise ValueError(
            f"longtune.distributed.s2_attention_sp: ring mode needs H_q to be a multiple of H_kv "
            f"(MHA / GQA / MQA), got H_q={q.shape[2]} and H_kv={k.shape[2]}"
        )
    run = {"halo": _halo, "ulysses": _ulysses, "ring": _ring}[chosen]
    return run(q, k, v, s2_group_size, s2_mode, scale, group, rank, world, timeout)
