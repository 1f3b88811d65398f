"""Sparse attention on CPU: mask/tile math, the CPU kernel vs the float64 reference (forward and
backward) over masks x head maps x dtypes, awkward shapes, padding, packing, no-leak, LongLoRA's
roll formula, gradcheck, opcheck, torch.compile, fuzzing, FLOPs, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import longtune
from longtune import AttentionMask
from longtune.ops.attention import count_pairs
from longtune.reference import attention as ref
from longtune.testing import assert_within_2x

from .attention_cases import HEADS, MASKS, make_qkv

RANGES = torch.ops.longtune.attention_mask_ranges


# ------------------------------------------------------------------ mask / tile math
def _dense_from_ranges(r, n_other):
    m = torch.zeros(r.shape[0], n_other, dtype=torch.bool)
    for i in range(r.shape[0]):
        for t in range(2):
            m[i, r[i, t, 0] : r[i, t, 1]] = True
    return m


# (roll mode is defined for square attention only: those pairs are not part of the grid; the
# op's refusal of them is tested in test_roll_mode_needs_square_attention)
MASK_GRID = [
    (nq, nk, kw)
    for (_, kw) in MASKS
    for (nq, nk) in [(37, 37), (16, 16), (5, 23), (23, 5), (70, 70)]
    if nq == nk or kw.get("s2_mode") != "longlora_roll"
]
MASK_GRID += [
    (40, 40, dict(s2_group_size=16, kv_offset=-5)),
    (20, 30, dict(window=4, n_global=3, kv_offset=-6)),
    (12, 30, dict(s2_group_size=8, kv_offset=-7, q_offset=9)),
    (25, 25, dict(n_global=40, window=2, kv_offset=-20)),
]
MASK_GRID += [
    (40, 40, dict(s2_group_size=16, kv_offset=7)),
    (12, 30, dict(window=4, n_global=3, kv_offset=2)),
    (20, 30, dict(q_offset=3)),
    (20, 20, dict(s2_group_size=64)),
    (20, 20, dict(s2_group_size=64, s2_mode="longlora_roll")),
]


@pytest.mark.parametrize("nq,nk,kw", MASK_GRID)
@pytest.mark.parametrize("head", [0, 3])
def test_mask_ranges_equal_dense_reference(nq, nk, kw, head):
    enc = AttentionMask.from_keywords(**kw).to_list()
    dense = ref.attention_mask(nq, nk, shifted=head >= 2, **kw)
    rows = RANGES(nq, nk, head, 4, enc, False, 0, 0, 0)
    cols = RANGES(nq, nk, head, 4, enc, True, 0, 0, 0)
    assert torch.equal(_dense_from_ranges(rows, nk), dense)
    assert torch.equal(_dense_from_ranges(cols, nq), dense.T)
    # ranges are disjoint and sorted
    assert bool(((rows[:, 0, 1] <= rows[:, 1, 0]) | (rows[:, 1, 1] == 0)).all())


@pytest.mark.parametrize("nq,nk,kw", MASK_GRID[::3])
@pytest.mark.parametrize("tile", [4, 7, 16])
def test_tile_ranges_are_exactly_the_nonempty_tiles(nq, nk, kw, tile):
    enc = AttentionMask.from_keywords(**kw).to_list()
    for head in (0, 3):
        dense = ref.attention_mask(nq, nk, shifted=head >= 2, **kw)
        for cols in (False, True):
            m = dense.T if cols else dense
            n, n_other = m.shape
            for i0 in range(0, n, tile):
                blk = m[i0 : i0 + tile]
                want = {
                    t
                    for t in range(math.ceil(n_other / tile))
                    if blk[:, t * tile : (t + 1) * tile].any()
                }
                r = RANGES(nq, nk, head, 4, enc, cols, i0, min(n, i0 + tile), tile)
                got = {t for j in range(2) for t in range(int(r[j, 0]), int(r[j, 1]))}
                assert want <= got, (i0, want - got)  # never skips a non-empty tile
                assert got == want, (i0, got - want)  # and visits no empty one


# ------------------------------------------------------------------ kernel vs reference
def _check(b, nq, nk, hq, hkv, d, kw, dtype, packed=False, cu=None, kpm=None):
    q, k, v = make_qkv(b, nq, nk, hq, hkv, d, torch.float64, packed=packed, requires_grad=True)
    extra = dict(kw)
    if cu is not None:
        extra["cu_seqlens"] = cu
    if kpm is not None:
        extra["key_padding_mask"] = kpm
    r64, lse64 = ref.sparse_attention(q, k, v, return_lse=True, **extra)
    g = torch.randn_like(r64)
    grads64 = torch.autograd.grad(r64, (q, k, v), g)
    qd, kd, vd = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = longtune.sparse_attention(qd, kd, vd, return_lse=True, **extra)
    grads = torch.autograd.grad(out, (qd, kd, vd), g.to(dtype))
    if dtype == torch.float64:
        torch.testing.assert_close(out, r64, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse, lse64, rtol=1e-10, atol=1e-10)
        for a, e in zip(grads, grads64):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
        return
    rd, lsed = ref.sparse_attention(qd, kd, vd, return_lse=True, **extra)
    gradsd = torch.autograd.grad(rd, (qd, kd, vd), g.to(dtype))
    assert_within_2x(out, r64, rd, "out")
    fin = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), fin)
    assert_within_2x(lse[fin], lse64[fin], lsed.float()[fin], "lse")
    for name, a, e, t in zip("qkv", grads, grads64, gradsd):
        assert_within_2x(a, e, t, "d" + name)


@pytest.mark.parametrize("name,kw", MASKS, ids=[m[0] for m in MASKS])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_reference(name, kw, hq, hkv, dtype):
    _check(2, 45, 45, hq, hkv, 16, kw, dtype)


@pytest.mark.parametrize("n", [1, 2, 7, 63, 64, 65, 130])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(s2_group_size=8),
        dict(s2_group_size=256),
        dict(window=3, n_global=1),
        dict(s2_group_size=8, s2_mode="longlora_roll"),
    ],
)
def test_awkward_lengths(n, kw):
    _check(1, n, n, 2, 1, 8, kw, torch.float64)


@pytest.mark.parametrize("d", [1, 3, 64, 80, 96, 128, 256])
def test_head_dims(d):
    _check(1, 70, 70, 2, 2, d, dict(s2_group_size=16), torch.float32)


@pytest.mark.parametrize("nq,nk", [(10, 90), (64, 200), (90, 10)])
@pytest.mark.parametrize(
    "kw", [dict(), dict(s2_group_size=8), dict(window=9, n_global=2), dict(q_offset=5)]
)
def test_query_chunk_attends_longer_kv(nq, nk, kw):
    _check(2, nq, nk, 2, 2, 8, kw, torch.float64)


@pytest.mark.parametrize("kw", [dict(), dict(s2_group_size=8), dict(causal=False, window=(4, 4))])
def test_key_padding_batch_rows_differ(kw):
    b, n = 3, 40
    lens = [40, 23, 9]
    kpm = torch.zeros(b, n, dtype=torch.bool)
    for i, L in enumerate(lens):
        kpm[i, n - L :] = True  # left padding, different per row (what LongLoRA pairs wrongly)
    _check(b, n, n, 2, 2, 8, kw, torch.float64, kpm=kpm)
    _check(b, n, n, 2, 1, 8, kw, torch.float32, kpm=kpm)


def test_padded_rows_with_no_visible_key_are_zero_and_grads_finite():
    q, k, v = make_qkv(2, 16, 16, 2, 2, 8, torch.float64, requires_grad=True)
    kpm = torch.ones(2, 16, dtype=torch.bool)
    kpm[1] = False  # row 1 sees nothing at all
    kpm[0, :5] = False  # causal queries 0..4 of row 0 see nothing
    out, lse = longtune.sparse_attention(q, k, v, key_padding_mask=kpm, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isinf(lse[1]).all()
    assert torch.equal(out[0, :5], torch.zeros_like(out[0, :5]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize(
    "kw", [dict(), dict(s2_group_size=6), dict(window=4, n_global=2), dict(causal=False)]
)
def test_packed_varlen_equals_per_sequence(kw):
    lens = [13, 0, 37, 1, 30]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    total = int(cu[-1])
    _check(1, total, total, 4, 2, 8, kw, torch.float64, packed=True, cu=cu)
    q, k, v = make_qkv(1, total, total, 4, 2, 8, torch.float32, packed=True)
    out = longtune.sparse_attention(q, k, v, cu_seqlens=cu, **kw)
    for i in range(len(lens)):
        s, e = int(cu[i]), int(cu[i + 1])
        if e > s:
            one = longtune.sparse_attention(q[None, s:e], k[None, s:e], v[None, s:e], **kw)[0]
            torch.testing.assert_close(out[s:e], one, rtol=0, atol=1e-6)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1), (2, 4)])
@pytest.mark.parametrize("n,g", [(64, 16), (61, 16), (10, 16)])
def test_leakfree_never_sees_the_future(hq, hkv, n, g):
    q, k, v = make_qkv(1, n, n, hq, hkv, 8, torch.float64)
    base = longtune.sparse_attention(q, k, v, s2_group_size=g)
    for i in [0, g // 2 - 1, g // 2, n // 2, n - 2]:
        if not 0 <= i < n - 1:
            continue
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[:, i + 1 :] = torch.randn_like(t[:, i + 1 :]) * 3
        out = longtune.sparse_attention(q2, k2, v2, s2_group_size=g)
        torch.testing.assert_close(out[:, : i + 1], base[:, : i + 1], rtol=0, atol=0)


def test_longlora_roll_leaks_as_documented():
    n, g = 32, 8
    q, k, v = make_qkv(1, n, n, 2, 2, 8, torch.float64)
    base = longtune.sparse_attention(q, k, v, s2_group_size=g, s2_mode="longlora_roll")
    k2 = k.clone()
    k2[:, -1] += 1.0  # the last token is visible to tokens [0, G/2) of the shifted head
    out = longtune.sparse_attention(q, k2, v, s2_group_size=g, s2_mode="longlora_roll")
    assert not torch.equal(out[:, : g // 2, 1], base[:, : g // 2, 1])
    assert torch.equal(out[:, : g // 2, 0], base[:, : g // 2, 0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("h", [1, 2, 4])
def test_roll_mode_equals_longlora_transcription(dtype, h):
    q, k, v = make_qkv(2, 48, 48, h, h, 16, dtype)
    want = ref.longlora_roll_attention(q, k, v, 16)
    got = longtune.sparse_attention(q, k, v, s2_group_size=16, s2_mode="longlora_roll")
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(s2_group_size=4),
        dict(s2_group_size=4, s2_mode="longlora_roll"),
        dict(window=3, n_global=1),
        dict(causal=False),
    ],
)
@pytest.mark.parametrize("hq,hkv", [(2, 1), (1, 2)])
def test_gradcheck_float64(kw, hq, hkv):
    q, k, v = make_qkv(1, 9, 9, hq, hkv, 4, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: longtune.sparse_attention(a, b, c, **kw), (q, k, v)
    )


def test_gradcheck_packed_and_padding():
    q, k, v = make_qkv(1, 11, 11, 2, 1, 4, torch.float64, packed=True, requires_grad=True)
    cu = torch.tensor([0, 4, 11])
    assert torch.autograd.gradcheck(
        lambda a, b, c: longtune.sparse_attention(a, b, c, cu_seqlens=cu, s2_group_size=4),
        (q, k, v),
    )
    q, k, v = make_qkv(2, 7, 7, 2, 2, 4, torch.float64, requires_grad=True)
    kpm = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda a, b, c: longtune.sparse_attention(a, b, c, key_padding_mask=kpm, causal=False),
        (q, k, v),
    )


def _op_args(q, k, v, kw, kpm=None, cu=None):
    kw = dict(kw)
    cap = kw.pop("softcap", None)
    a = (
        q,
        k,
        v,
        kpm,
        cu,
        cu,
        0,
        0,
        q.shape[-1] ** -0.5,
        AttentionMask.from_keywords(**kw).to_list(),
    )
    return a if cap is None else a + (float(cap),)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(s2_group_size=4), dict(window=3, n_global=1), dict(s2_group_size=4, softcap=1.5)],
)
def test_opcheck(kw):
    q, k, v = make_qkv(2, 20, 20, 2, 1, 8, torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.longtune.sparse_attention_fwd, _op_args(q, k, v, kw))
    out, lse = torch.ops.longtune.sparse_attention_fwd(*_op_args(q, k, v, kw))
    go = torch.randn_like(out)
    a = _op_args(q.detach(), k.detach(), v.detach(), kw)
    torch.library.opcheck(
        torch.ops.longtune.sparse_attention_bwd, (go, *a[:3], out.detach(), lse, *a[3:])
    )
    qp, kp, vp = make_qkv(1, 20, 20, 2, 1, 8, torch.float32, packed=True, requires_grad=True)
    torch.library.opcheck(
        torch.ops.longtune.sparse_attention_fwd,
        _op_args(qp, kp, vp, kw, cu=torch.tensor([0, 8, 20])),
    )


# ------------------------------------------------------------------ logit softcapping
SOFTCAP_MASKS = [
    m
    for m in MASKS
    if m[0] in ("causal", "full", "s2", "s2_roll", "lambda", "window_lr", "s2_lambda")
]


@pytest.mark.parametrize("name,kw", SOFTCAP_MASKS, ids=[m[0] for m in SOFTCAP_MASKS])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (1, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_softcap_matches_reference(name, kw, hq, hkv, dtype):
    _check(2, 45, 45, hq, hkv, 16, dict(kw, softcap=1.5), dtype)


def test_softcap_reference_is_gemma2s_formula():
    # Gemma-2 (transformers eager_attention_forward): w = q k^T * scaling; w = tanh(w / c) * c;
    # causal mask; softmax; w v
    q, k, v = make_qkv(2, 30, 30, 4, 2, 16, torch.float64)
    c, scale = 2.0, 0.3
    qh, kh, vh = (
        q.transpose(1, 2),
        k.repeat_interleave(2, 2).transpose(1, 2),
        v.repeat_interleave(2, 2).transpose(1, 2),
    )
    w = torch.tanh(qh @ kh.transpose(-1, -2) * scale / c) * c
    w = w.masked_fill(torch.ones(30, 30, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    want = (w @ vh).transpose(1, 2)
    torch.testing.assert_close(ref.sparse_attention(q, k, v, softmax_scale=scale, softcap=c), want)
    torch.testing.assert_close(
        longtune.sparse_attention(q, k, v, softmax_scale=scale, softcap=c), want
    )
    # and capping changes the result (the scores reach the tanh's curved part)
    assert (longtune.sparse_attention(q, k, v, softmax_scale=scale) - want).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kw", [dict(), dict(s2_group_size=8), dict(window=9, n_global=2), dict(q_offset=5)]
)
def test_softcap_query_chunk_attends_longer_kv(kw):
    _check(2, 20, 70, 2, 2, 8, dict(kw, softcap=0.7), torch.float64)


def test_softcap_padding_and_packing():
    lens = [13, 0, 37, 1, 30]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    total = int(cu[-1])
    _check(
        1,
        total,
        total,
        4,
        2,
        8,
        dict(s2_group_size=6, softcap=1.0),
        torch.float64,
        packed=True,
        cu=cu,
    )
    kpm = torch.zeros(3, 40, dtype=torch.bool)
    for i, n in enumerate([40, 23, 9]):
        kpm[i, 40 - n :] = True
    _check(3, 40, 40, 2, 1, 8, dict(softcap=1.0), torch.float64, kpm=kpm)
    _check(
        3, 40, 40, 2, 1, 8, dict(causal=False, window=(4, 4), softcap=1.0), torch.float32, kpm=kpm
    )


def test_softcap_return_lse():
    q, k, v = make_qkv(1, 33, 33, 2, 2, 8, torch.float64)
    out, lse = longtune.sparse_attention(q, k, v, softcap=0.5, return_lse=True)
    want, wlse = ref.sparse_attention(q, k, v, softcap=0.5, return_lse=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, wlse)
    assert bool(
        (lse <= torch.log(torch.arange(1, 34, dtype=torch.float64)) + 0.5 + 1e-12).all()
    )  # |score| <= cap


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(s2_group_size=4),
        dict(s2_group_size=4, s2_mode="longlora_roll"),
        dict(window=3, n_global=1),
        dict(causal=False),
    ],
)
def test_softcap_gradcheck_float64(kw):
    q, k, v = make_qkv(1, 9, 9, 2, 1, 4, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: longtune.sparse_attention(a, b, c, softcap=0.8, **kw), (q, k, v)
    )


def test_softcap_gradcheck_packed_and_padding():
    q, k, v = make_qkv(1, 11, 11, 2, 1, 4, torch.float64, packed=True, requires_grad=True)
    cu = torch.tensor([0, 4, 11])
    assert torch.autograd.gradcheck(
        lambda a, b, c: longtune.sparse_attention(
            a, b, c, cu_seqlens=cu, s2_group_size=4, softcap=0.8
        ),
        (q, k, v),
    )
    q, k, v = make_qkv(2, 7, 7, 2, 2, 4, torch.float64, requires_grad=True)
    kpm = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda a, b, c: longtune.sparse_attention(
            a, b, c, key_padding_mask=kpm, causal=False, softcap=0.8
        ),
        (q, k, v),
    )


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    nq=st.integers(1, 70),
    extra_k=st.integers(0, 30),
    hkv=st.sampled_from([1, 2]),
    rep=st.sampled_from([1, 2, -2]),
    d=st.sampled_from([1, 4, 8]),
    causal=st.booleans(),
    g=st.sampled_from([None, 2, 6, 16]),
    window=st.sampled_from([None, 1, 9]),
    n_global=st.integers(0, 4),
    pad=st.booleans(),
    cap=st.sampled_from([0.1, 1.0, 5.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_softcap_fuzz_against_reference(
    b, nq, extra_k, hkv, rep, d, causal, g, window, n_global, pad, cap, seed
):
    hq = hkv * rep if rep > 0 else 1
    hk = hkv if rep > 0 else 2
    nk = nq + extra_k
    kw = dict(causal=causal, s2_group_size=g, window=window, n_global=n_global, softcap=cap)
    q, k, v = make_qkv(b, nq, nk, hq, hk, d, torch.float64, requires_grad=True, seed=seed)
    if pad:
        kw["key_padding_mask"] = (
            torch.rand(b, nk, generator=torch.Generator().manual_seed(seed)) > 0.3
        )
    out = longtune.sparse_attention(q, k, v, **kw)
    want = ref.sparse_attention(q, k, v, **kw)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g_out = torch.randn_like(out)
    for a, e in zip(
        torch.autograd.grad(out, (q, k, v), g_out), torch.autograd.grad(want, (q, k, v), g_out)
    ):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def test_softcap_zero_or_none_is_off_and_bad_values_refused():
    q, k, v = make_qkv(1, 20, 20, 2, 2, 8, torch.float32)
    base = longtune.sparse_attention(q, k, v)
    assert torch.equal(longtune.sparse_attention(q, k, v, softcap=0.0), base)
    assert torch.equal(longtune.sparse_attention(q, k, v, softcap=None), base)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap must be"):
            longtune.sparse_attention(q, k, v, softcap=bad)
        with pytest.raises(RuntimeError, match="softcap must be finite and >= 0"):
            torch.ops.longtune.sparse_attention_fwd(*_op_args(q, k, v, dict(softcap=bad)))


def test_softcap_torch_compile_fullgraph():
    q, k, v = make_qkv(1, 40, 40, 4, 2, 16, torch.float32, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return longtune.sparse_attention(q, k, v, s2_group_size=8, softcap=2.0).square().sum()

    loss = f(q, k, v)
    loss.backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    loss2 = longtune.sparse_attention(q2, k2, v2, s2_group_size=8, softcap=2.0).square().sum()
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(q.grad, q2.grad)


def test_softcap_flops_equal_uncapped():
    q, k, v = make_qkv(1, 64, 64, 4, 4, 16, torch.float32, requires_grad=True)
    counts = []
    for cap in (None, 2.0):
        with FlopCounterMode(display=False) as fc:
            longtune.sparse_attention(q, k, v, s2_group_size=16, softcap=cap).sum().backward()
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_torch_compile_fullgraph():
    q, k, v = make_qkv(1, 40, 40, 4, 2, 16, torch.float32, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return longtune.sparse_attention(q, k, v, s2_group_size=8).square().sum()

    loss = f(q, k, v)
    loss.backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    loss2 = longtune.sparse_attention(q2, k2, v2, s2_group_size=8).square().sum()
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(q.grad, q2.grad)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    nq=st.integers(1, 70),
    extra_k=st.integers(0, 30),
    hkv=st.sampled_from([1, 2]),
    rep=st.sampled_from([1, 2, -2]),
    d=st.sampled_from([1, 4, 8]),
    causal=st.booleans(),
    g=st.sampled_from([None, 2, 4, 6, 16]),
    window=st.sampled_from([None, 1, 3, 9]),
    n_global=st.integers(0, 4),
    pad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_reference(
    b, nq, extra_k, hkv, rep, d, causal, g, window, n_global, pad, seed
):
    hq = hkv * rep if rep > 0 else 1
    hk = hkv if rep > 0 else 2
    nk = nq + extra_k
    kw = dict(causal=causal, s2_group_size=g, window=window, n_global=n_global)
    q, k, v = make_qkv(b, nq, nk, hq, hk, d, torch.float64, requires_grad=True, seed=seed)
    kpm = None
    if pad:
        kpm = torch.rand(b, nk, generator=torch.Generator().manual_seed(seed)) > 0.3
        kw["key_padding_mask"] = kpm
    out = longtune.sparse_attention(q, k, v, **kw)
    want = ref.sparse_attention(q, k, v, **kw)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g_out)
    exp = torch.autograd.grad(want, (q, k, v), g_out)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------- AttentionMask and sequence-parallel shards
def test_attention_mask_value_type():
    m = AttentionMask(s2_group_size=8, window_left=None, q_offset=None, kv_offset=-3)
    assert (m.s2_mode, m.window_left, m.q_offset) == ("leakfree", -1, -1)
    assert AttentionMask.from_list(m.to_list()) == m and len(m.to_list()) == 11
    assert AttentionMask(s2_mode="longlora_roll") == AttentionMask()  # no S^2: the mode is "none"
    assert AttentionMask.from_keywords(
        s2_group_size=8, window=(3, None), n_global=2
    ) == AttentionMask(s2_group_size=8, window_left=3, n_global=2)
    assert m.replace(s2_group_size=0).s2_mode == "none"
    assert AttentionMask(head_offset=2, total_heads=4).shifted(
        0, 2
    ) and not AttentionMask().shifted(0, 2)
    with pytest.raises(AttributeError):
        m.causal = False  # frozen
    for kw, match in [
        (dict(s2_group_size=3), "even number >= 2"),
        (dict(s2_group_size=4, s2_mode="none"), "needs s2_mode"),
        (dict(s2_mode="roll"), "s2_mode must be one of"),
        (dict(window_left=0), "window_left must be"),
        (dict(n_global=-1), "n_global must be >= 0"),
        (dict(head_offset=1), "needs total_heads"),
        (dict(head_offset=4, total_heads=4), "head_offset must be < total_heads"),
        (dict(s2_group_size=4, s2_mode="longlora_roll", kv_offset=-2), "takes no window"),
        (dict(causal=1), "causal must be a bool"),
        (dict(kv_offset=1.5), "kv_offset must be an int"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            AttentionMask(**kw)


def test_mask_argument_equals_keywords():
    q, k, v = make_qkv(2, 30, 30, 4, 2, 8, torch.float64)
    kw = dict(s2_group_size=8, window=(6, None), n_global=2)
    want = longtune.sparse_attention(q, k, v, **kw)
    assert torch.equal(
        longtune.sparse_attention(q, k, v, mask=AttentionMask.from_keywords(**kw)), want
    )
    with pytest.raises(ValueError, match="not both"):
        longtune.sparse_attention(q, k, v, mask=AttentionMask(), s2_group_size=8)
    with pytest.raises(TypeError, match="mask must be a longtune.AttentionMask"):
        longtune.sparse_attention(q, k, v, mask=[1, 1, 0, 0, -1, -1, 0, -1, 0, 0, 0])
    assert count_pairs(30, 30, 4, mask=AttentionMask.from_keywords(**kw)) == count_pairs(
        30, 30, 4, **kw
    )


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 4), (8, 1)])
@pytest.mark.parametrize(
    "kw",
    [
        dict(s2_group_size=8),
        dict(s2_group_size=8, s2_mode="longlora_roll"),
        dict(s2_group_size=8, window=5, n_global=2, causal=False),
    ],
)
def test_head_shard_equals_head_slice_of_full_run(hq, hkv, kw):
    # a rank holding output heads [h0, h0 + 4) of 8 computes exactly those heads of the full run
    q, k, v = make_qkv(2, 40, 40, hq, hkv, 8, torch.float64, requires_grad=True)
    full = longtune.sparse_attention(q, k, v, **kw)
    g = torch.randn_like(full)
    dq, dk, dv = torch.autograd.grad(full, (q, k, v), g)
    r = hq // hkv
    for h0 in (0, 2, 4):
        mask = AttentionMask.from_keywords(**kw).replace(head_offset=h0, total_heads=8)
        kv0, kv1 = h0 // r, (h0 + 4 - 1) // r + 1  # the kv heads those query heads read (GQA / MQA)
        if (h0 - kv0 * r) % r and hkv > 1:
            continue  # a shard must start on a kv-group boundary
        qs, ks, vs = (
            t.detach()[:, :, a:b].clone().requires_grad_()
            for t, a, b in ((q, h0, h0 + 4), (k, kv0, kv1), (v, kv0, kv1))
        )
        out = longtune.sparse_attention(qs, ks, vs, mask=mask)
        want = ref.sparse_attention(qs, ks, vs, head_offset=h0, total_heads=8, **kw)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out, full[:, :, h0 : h0 + 4], rtol=1e-10, atol=1e-10)
        gs = torch.autograd.grad(out, (qs, ks, vs), g[:, :, h0 : h0 + 4])
        torch.testing.assert_close(gs[0], dq[:, :, h0 : h0 + 4], rtol=1e-9, atol=1e-9)
        if hkv == hq:
            torch.testing.assert_close(gs[1], dk[:, :, h0 : h0 + 4], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(gs[2], dv[:, :, h0 : h0 + 4], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "kw",
    [
        dict(s2_group_size=16),
        dict(s2_group_size=16, window=(12, None)),
        dict(window=10),
        dict(causal=False, window=(9, 4)),
    ],
)
@pytest.mark.parametrize("start,halo", [(32, 20), (48, 48), (16, 10)])
def test_query_shard_with_negative_offset_halo_equals_rows_of_full_run(kw, start, halo):
    # positions local to the shard: its queries at 0.., the halo keys before them (a neighbour's
    # rows) at -halo..-1, so kv_offset = -halo; S^2 groups line up (start is a multiple of G) and
    # the halo covers every earlier key a shard row sees
    n, shard = 96, 16
    q, k, v = make_qkv(1, n, n, 4, 2, 8, torch.float64)
    full = longtune.sparse_attention(q, k, v, **kw)
    qs, ks, vs = q[:, start : start + shard], k[:, start - halo :], v[:, start - halo :]
    got = longtune.sparse_attention(qs, ks, vs, kv_offset=-halo, q_offset=halo, **kw)
    want = ref.sparse_attention(qs, ks, vs, kv_offset=-halo, q_offset=halo, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, full[:, start : start + shard], rtol=1e-10, atol=1e-10)
    if kw.get("causal", True):
        # keys up to the shard's last query: the default bottom-right alignment puts its first query
        # at position 0 as well
        end = halo + shard
        bottom_right = longtune.sparse_attention(
            qs, ks[:, :end], vs[:, :end], kv_offset=-halo, **kw
        )
        torch.testing.assert_close(bottom_right, got, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "kw",
    [
        dict(s2_group_size=8),
        dict(window=4, n_global=3),
        dict(s2_group_size=8, window=6, n_global=2),
    ],
)
def test_negative_kv_offset_matches_reference(kw):
    # keys before position 0 belong to earlier S^2 groups and are never global tokens
    _check(2, 30, 45, 4, 2, 8, dict(kw, kv_offset=-12), torch.float64)
    _check(2, 30, 45, 4, 2, 8, dict(kw, kv_offset=-12, q_offset=20), torch.float32)


# ------------------------------------------------------------------ FLOPs
def test_flop_counter_counts_unmasked_pairs_only():
    n, h, d = 64, 4, 16
    q, k, v = make_qkv(1, n, n, h, h, d, torch.float32, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        longtune.sparse_attention(q, k, v)
    assert fc.get_total_flops() == 4 * d * h * n * (n + 1) // 2
    g = 16
    pairs = count_pairs(n, n, h, s2_group_size=g)
    assert pairs == sum(
        int(ref.attention_mask(n, n, shifted=e >= h // 2, s2_group_size=g).sum()) for e in range(h)
    )
    with FlopCounterMode(display=False) as fc:
        longtune.sparse_attention(q, k, v, s2_group_size=g).sum().backward()
    assert fc.get_total_flops() == 4 * d * pairs + 10 * d * pairs
    # a head shard counts its own heads: [2, 4) of 4 are both shifted
    shard = AttentionMask(s2_group_size=g, head_offset=2, total_heads=4)
    assert count_pairs(n, n, 2, mask=shard) == 2 * int(
        ref.attention_mask(n, n, shifted=True, s2_group_size=g).sum()
    )
    with FlopCounterMode(display=False) as fc:
        longtune.sparse_attention(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], mask=shard)
    assert fc.get_total_flops() == 4 * d * count_pairs(n, n, 2, mask=shard)


# ------------------------------------------------------------------ bad input
def _qkv(b=1, n=8, h=2, d=8, **kw):
    return make_qkv(b, n, n, h, h, d, torch.float32, **kw)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, v: (q, k[:, :5], v), "k and v must have the same shape"),
        (lambda q, k, v: (q, k[:1], v[:1]), "same batch size"),
        (lambda q, k, v: (q[..., :4], k, v), "same head_dim"),
        (lambda q, k, v: (q[:, :, :1].expand(-1, -1, 3, -1), k, v), "must divide one another"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), "must be float32"),
        (lambda q, k, v: (q, k.double(), v), "same dtype"),
        (lambda q, k, v: (q[0], k, v), r"q must be \(batch, seqlen, heads, head_dim\)"),
        (lambda q, k, v: (q, k.to("meta"), v), "same device"),
    ],
)
def test_bad_tensors(mutate, match):
    q, k, v = _qkv(b=2)
    q, k, v = mutate(q, k, v)
    with pytest.raises(RuntimeError, match=match):
        longtune.sparse_attention(q, k, v)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(s2_group_size=1), "even number >= 2"),
        (dict(s2_group_size=5), "even number >= 2"),
        (dict(s2_group_size=4, s2_mode="roll"), "s2_mode must be one of"),
        (dict(window=0), "window must be >= 1"),
        (dict(window=(0, 2)), "window sizes must be >= 1"),
        (dict(window="x"), "window must be an int"),
        (dict(s2_group_size=4, s2_mode="longlora_roll", window=3), "takes no window"),
        (dict(softmax_scale=float("nan")), "softmax_scale must be finite"),
    ],
)
def test_bad_mask_arguments(kw, match):
    q, k, v = _qkv()
    with pytest.raises((RuntimeError, ValueError), match=match):
        longtune.sparse_attention(q, k, v, **kw)


def test_bad_op_level_mask_arguments():
    q, k, v = _qkv()
    a = list(_op_args(q, k, v, dict()))
    enc = AttentionMask().to_list()
    for changes, match in [
        ({2: 3, 3: 1}, "s2_group_size must be an even number"),
        ({2: 4, 3: 0}, "needs s2_mode"),
        ({3: 7}, "s2_mode must be 0"),
        ({1: 2}, "causal must be 0 or 1"),
        ({4: 0}, r"window \(left\) must be >= 1"),
        ({6: -1}, "n_global must be >= 0"),
        ({9: 1}, "head_offset=1 needs total_heads"),
        ({9: 3, 10: 4}, r"must lie within total_heads=4"),
        ({2: 4, 3: 2, 8: 2}, "takes no window, n_global or offsets"),
        ({0: 2}, "version 1"),
        ({11: 0}, "11-integer encoding"),
    ]:
        bad = list(enc) + ([0] if 11 in changes else [])
        for i, x in changes.items():
            bad[i] = x
        a[9] = bad
        with pytest.raises(RuntimeError, match=match):
            torch.ops.longtune.sparse_attention_fwd(*a)


@pytest.mark.parametrize(
    "cu,match",
    [
        (torch.tensor([0, 9, 5, 16]), "non-decreasing"),
        (torch.tensor([0, 5, 15]), r"must equal the number of packed rows \(16\)"),
        (torch.tensor([1, 5, 16]), r"\[0\] must be 0"),
        (torch.tensor([[0, 16]]), "1-D int32 or int64"),
        (torch.tensor([0.0, 16.0]), "1-D int32 or int64"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    q, k, v = make_qkv(1, 16, 16, 2, 2, 8, torch.float32, packed=True)
    with pytest.raises(RuntimeError, match=match):
        longtune.sparse_attention(q, k, v, cu_seqlens=cu)


def test_bad_padding_mask_and_packed_padding():
    q, k, v = _qkv(b=2)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must have shape \(batch, seqlen_k\)"):
        longtune.sparse_attention(q, k, v, key_padding_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="key_padding_mask must be bool"):
        longtune.sparse_attention(q, k, v, key_padding_mask=torch.ones(2, 8))
    qp, kp, vp = make_qkv(1, 16, 16, 2, 2, 8, torch.float32, packed=True)
    with pytest.raises(RuntimeError, match="cannot be combined with cu_seqlens"):
        longtune.sparse_attention(
            qp,
            kp,
            vp,
            cu_seqlens=torch.tensor([0, 16]),
            key_padding_mask=torch.ones(1, 16, dtype=torch.bool),
        )


def test_roll_mode_needs_square_attention():
    q, _, _ = make_qkv(1, 8, 8, 2, 2, 8, torch.float32)
    _, k, v = make_qkv(1, 12, 12, 2, 2, 8, torch.float32)
    with pytest.raises(RuntimeError, match="as many queries as keys"):
        longtune.sparse_attention(q, k, v, s2_group_size=4, s2_mode="longlora_roll")


def test_empty_inputs():
    q, k, v = make_qkv(0, 8, 8, 2, 2, 8, torch.float32, requires_grad=True)
    out = longtune.sparse_attention(q, k, v)
    assert out.shape == (0, 8, 2, 8)
    q, k, v = make_qkv(2, 0, 0, 2, 2, 8, torch.float32, requires_grad=True)
    out, lse = longtune.sparse_attention(q, k, v, return_lse=True)
    assert out.shape == (2, 0, 2, 8) and lse.shape == (2, 2, 0)
    out.sum().backward()
    q, _, _ = make_qkv(1, 4, 4, 2, 2, 8, torch.float32)
    _, k, v = make_qkv(1, 0, 0, 2, 2, 8, torch.float32)
    out, lse = longtune.sparse_attention(q, k, v, causal=False, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
