"""NaN / Inf are never hidden: every kernel (CPU, and the CUDA device code on the emulator)
propagates non-finite inputs as the PyTorch reference does - the same torch.isfinite pattern, finite
values close - while rows the mask leaves empty stay defined (output 0, lse -inf, zero gradients)
and masked / ignored entries are never read."""

import math

import pytest
import torch
import torch.nn.functional as F

import longtune
from longtune.reference import attention as RA
from longtune.reference import hadamard as RH
from longtune.reference import quant as RQ
from longtune.reference import sparse_delta as RSD
from longtune.testing import emulated

NAN, INF = float("nan"), float("inf")
L = torch.ops.longtune


def same_pattern(out, ref, what, atol=1e-3, rtol=1e-3):
    """Equal isfinite masks, finite values close (NaN vs inf does not matter: both diverged)."""
    out, ref = out.double(), ref.double()
    fo, fr = torch.isfinite(out), torch.isfinite(ref)
    assert torch.equal(fo, fr), (
        f"{what}: finiteness differs at {(fo != fr).nonzero()[:8].tolist()} "
        f"(kernel finite {int(fo.sum())}, reference finite {int(fr.sum())})"
    )
    if fo.any():
        torch.testing.assert_close(out[fo], ref[fr], atol=atol, rtol=rtol, msg=what)


# ------------------------------------------------------------------------------------ attention
ATTN_FWD = {"cpu": L.sparse_attention_fwd, "emu": emulated("sparse_attention_fwd")}
ATTN_BWD = {"cpu": L.sparse_attention_bwd, "emu": emulated("sparse_attention_bwd")}


def _attn_inputs(backend, n=80, h=2, d=64, b=2):
    dt = torch.float32 if backend == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(b, n, h, d) for _ in range(3))
    return q, k, v, dt


def _poison(q, k, v, case):
    """Non-finite values placed in one tensor; returns the tensors."""
    q, k, v = q.clone(), k.clone(), v.clone()
    if case == "q_row_nan":
        q[0, 37, 1] = NAN  # one whole query row
    elif case == "q_elem_inf":
        q[1, 70, 0, 3] = INF
    elif case == "k_nan":
        k[0, 40, 0, 5] = NAN  # one key: rows that see it (j >= 40, causal) are NaN, the others not
    elif case == "k_inf":
        k[1, 66, 1, 0] = INF
    elif case == "v_nan":
        v[0, 30, 1, 7] = NAN
    elif case == "v_inf":
        v[1, 3, 0, 0] = -INF
    return q, k, v


MASKS = {
    "causal": dict(causal=True),
    "window": dict(causal=True, window=24),
    "s2": dict(causal=True, s2_group_size=16),
    "full": dict(causal=False),
}


def _run(backend, q, k, v, dt, mask_kw, kpm=None):
    mask = longtune.AttentionMask.from_keywords(**mask_kw)
    scale = 1 / math.sqrt(q.shape[-1])
    args = (kpm, None, None, 0, 0, scale, mask.to_list())
    qd, kd, vd = q.to(dt), k.to(dt), v.to(dt)
    out, lse = ATTN_FWD[backend](qd, kd, vd, *args)
    go = torch.randn_like(out)
    dq, dk, dv = ATTN_BWD[backend](go, qd, kd, vd, out, lse, *args)
    # the reference in float64 on the same (rounded) inputs
    q6, k6, v6 = (t.double().requires_grad_() for t in (qd, kd, vd))
    ro, rl = RA.sparse_attention(
        q6, k6, v6, key_padding_mask=kpm, softmax_scale=scale, return_lse=True, **mask_kw
    )
    rdq, rdk, rdv = torch.autograd.grad(ro, (q6, k6, v6), go.double())
    return (out, lse, dq, dk, dv), (ro, rl, rdq, rdk, rdv)


@pytest.mark.parametrize("backend", ["cpu", "emu"])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("case", ["q_row_nan", "q_elem_inf", "k_nan", "k_inf", "v_nan", "v_inf"])
def test_attention_forward_pattern(backend, mask, case):
    q, k, v, dt = _attn_inputs(backend)
    q, k, v = _poison(q, k, v, case)
    (out, lse, *_), (ro, rl, *_) = _run(backend, q, k, v, dt, MASKS[mask])
    tol = 2e-2 if dt == torch.bfloat16 else 1e-4
    same_pattern(out, ro, f"{backend} {mask} {case}: out", atol=tol, rtol=tol)
    same_pattern(lse, rl, f"{backend} {mask} {case}: lse", atol=tol, rtol=tol)
    assert not torch.isfinite(out).all(), "a non-finite input that some row reads must show"


# The device backward (emulated CUDA) still multiplies a masked pair's dS = 0 by the other operand's
# row inside a partially masked tile (dQ += dS K, dK += dS^T Q), so a NaN key / query row that the
# mask hides can reach dq / dk of rows in the same 64 x 64 tile. Known gap, marked strict xfail.
DEVICE_BWD_LEAK = (
    "device backward: masked pairs in a partial tile still multiply a non-finite row (0 * NaN)"
)


@pytest.mark.parametrize("backend", ["cpu", "emu"])
@pytest.mark.parametrize("case", ["q_row_nan", "k_nan", "v_nan", "v_inf"])
def test_attention_backward_rows(backend, case, request):
    """Gradients of the rows that read a non-finite value are non-finite; dq of every other row is
    finite and equal to the reference."""
    if backend == "emu" and case == "k_nan":
        request.applymarker(pytest.mark.xfail(strict=True, reason=DEVICE_BWD_LEAK))
    q, k, v, dt = _attn_inputs(backend)
    q, k, v = _poison(q, k, v, case)
    (out, lse, dq, dk, dv), (ro, rl, rdq, rdk, rdv) = _run(backend, q, k, v, dt, MASKS["causal"])
    tol = 5e-2 if dt == torch.bfloat16 else 1e-3
    same_pattern(dq, rdq, f"{backend} {case}: dq", atol=tol, rtol=tol)
    bad_rows = ~torch.isfinite(ro).all(-1)  # (B, N, H)
    assert bad_rows.any()
    assert (~torch.isfinite(dq[bad_rows]).all(-1)).all(), "affected rows must have non-finite dq"
    if backend == "cpu":  # the CPU backward keeps masked pairs out of every gradient
        same_pattern(dk, rdk, f"{backend} {case}: dk", atol=tol, rtol=tol)
        same_pattern(dv, rdv, f"{backend} {case}: dv", atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["cpu", "emu"])
def test_attention_all_nan_q(backend):
    q, k, v, dt = _attn_inputs(backend)
    q.fill_(NAN)
    (out, lse, dq, *_), _ = _run(backend, q, k, v, dt, MASKS["causal"])
    assert torch.isnan(out).all() and torch.isnan(lse).all() and torch.isnan(dq).all()


@pytest.mark.parametrize("backend", ["cpu", "emu"])
@pytest.mark.parametrize("where", ["k", "v", "q"])
def test_attention_padded_rows_stay_defined(backend, where, request):
    """Padded keys hold NaN: no row reads them. A batch element with every key padded: its rows are
    empty - output 0, lse -inf, zero (finite) gradients - even with NaN in their own q rows."""
    if backend == "emu" and where in ("k", "q"):
        request.applymarker(pytest.mark.xfail(strict=True, reason=DEVICE_BWD_LEAK))
    q, k, v, dt = _attn_inputs(backend)
    kpm = torch.ones(2, 80, dtype=torch.bool)
    kpm[0, 50:] = False
    kpm[1, :] = False
    if where == "k":
        k[0, 60:] = NAN
        k[1] = NAN
    elif where == "v":
        v[0, 55, 0] = NAN
        v[1] = INF
    else:
        q[1] = NAN
    (out, lse, dq, dk, dv), (ro, rl, rdq, rdk, rdv) = _run(
        backend, q, k, v, dt, MASKS["full"], kpm=kpm
    )
    assert (
        torch.isfinite(out).all()
        and torch.isfinite(dq).all()
        and torch.isfinite(dk).all()
        and torch.isfinite(dv).all()
    )
    assert (out[1] == 0).all() and (lse[1] == -INF).all() and (dq[1] == 0).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()
    tol = 5e-2 if dt == torch.bfloat16 else 1e-3
    same_pattern(out, ro, "out", atol=tol, rtol=tol)
    same_pattern(dq, rdq, "dq", atol=tol, rtol=tol)


def test_attention_public_function_matches_sdpa_where_sdpa_does_not_leak():
    """q all NaN / a NaN key with no mask (nothing to leak): as torch's SDPA."""
    q, k, v = (torch.randn(1, 8, 40, 64) for _ in range(3))  # (B, H, N, D) for SDPA
    for case in ("q", "k"):
        qq, kk = q.clone(), k.clone()
        if case == "q":
            qq.fill_(NAN)
        else:
            kk[0, 0, 7, 3] = NAN
        ref = F.scaled_dot_product_attention(qq, kk, v, is_causal=True)
        out = longtune.sparse_attention(
            qq.transpose(1, 2), kk.transpose(1, 2), v.transpose(1, 2), causal=True
        )
        same_pattern(out.transpose(1, 2), ref, f"sdpa {case}")


def test_attention_module_propagates_nan():
    from longtune.nn import SparseQueryAttention

    m = SparseQueryAttention(128, 4, 4, 2, causal=True)
    x = torch.randn(1, 32, 128)
    x[0, 5, 3] = NAN
    y = m(x)
    # causal: token 5 and every later token read it; earlier tokens do not
    assert torch.isnan(y[0, 5:]).all() and torch.isfinite(y[0, :5]).all()


# ------------------------------------------------------------------------ linear cross-entropy
LCE_FWD = {"cpu": L.linear_cross_entropy_fwd, "emu": emulated("linear_cross_entropy_fwd")}
LCE_BWD = {"cpu": L.linear_cross_entropy_bwd, "emu": emulated("linear_cross_entropy_bwd")}


def _lce_inputs(poison, T=9, V=70, d=24):
    x, w, b = torch.randn(T, d), torch.randn(V, d) * 0.3, torch.randn(V)
    t = torch.randint(0, V, (T,))
    t[6] = -100
    if poison == "x_nan":
        x[2, 5] = NAN
    elif poison == "x_inf":
        x[4, 0] = INF
    elif poison == "x_ignored_nan":
        x[6] = NAN  # the ignored row: reads nothing, contributes nothing
    elif poison == "w_nan":
        w[33, 1] = NAN
    elif poison == "b_inf":
        b[3] = INF
    return x, w, b, t


def _lce_reference(x, w, b, t, g):
    """F.cross_entropy over the kept rows only (ignored rows read nothing); per-row losses,
    grads."""
    keep = t != -100
    x6, w6, b6 = (a.double().requires_grad_() for a in (x, w, b))
    rows = F.cross_entropy(x6[keep] @ w6.T + b6, t[keep], reduction="none")
    loss = torch.zeros(x.shape[0], dtype=torch.float64).masked_scatter(keep, rows)
    dx, dw, db = torch.autograd.grad(rows, (x6, w6, b6), g.double()[keep])
    return loss, dx, dw, db


@pytest.mark.parametrize("backend", ["cpu", "emu"])
@pytest.mark.parametrize("poison", ["x_nan", "x_inf", "x_ignored_nan", "w_nan", "b_inf"])
def test_linear_cross_entropy_pattern(backend, poison):
    x, w, b, t = _lce_inputs(poison)
    g = torch.rand(x.shape[0]) + 0.5
    loss, lse, _ = LCE_FWD[backend](x, w, b, t, -100, 0.0, 0.0, 0.0)
    dx, dw, db = LCE_BWD[backend](g, x, w, b, t, lse, -100, 0.0, 0.0, 0.0, 0.0)
    rl, rdx, rdw, rdb = _lce_reference(x, w, b, t, g)
    same_pattern(loss, rl, f"{backend} {poison}: loss")
    same_pattern(dx, rdx, f"{backend} {poison}: dx")
    same_pattern(dw, rdw, f"{backend} {poison}: dW")
    same_pattern(db, rdb, f"{backend} {poison}: dbias")
    assert loss[6] == 0 and (dx[6] == 0).all(), "an ignored row stays 0"


@pytest.mark.parametrize("rows", [0, 4], ids=["one-chunk", "rows4"])
@pytest.mark.parametrize("poison", ["x_nan", "x_inf", "x_ignored_nan", "w_nan", "b_inf"])
def test_linear_cross_entropy_one_pass_pattern(poison, rows, monkeypatch):
    # the emulated one-pass op (logits stored per chunk of rows, not recomputed): the same pattern
    if rows:
        monkeypatch.setenv("LT_LCE_DEVICE_ROWS", str(rows))
    x, w, b, t = _lce_inputs(poison)
    g = torch.rand(x.shape[0]) + 0.5
    fwd_bwd = emulated("linear_cross_entropy_fwd_bwd")
    loss, _, dx, dw, db, _ = fwd_bwd(x, w, b, t, g, -100, 0.0, 0.0, 0.0)
    rl, rdx, rdw, rdb = _lce_reference(x, w, b, t, g)
    same_pattern(loss, rl, f"one pass {poison}: loss")
    same_pattern(dx, rdx, f"one pass {poison}: dx")
    same_pattern(dw, rdw, f"one pass {poison}: dW")
    same_pattern(db, rdb, f"one pass {poison}: dbias")
    assert loss[6] == 0 and (dx[6] == 0).all(), "an ignored row stays 0"


@pytest.mark.parametrize("backend", ["cpu", "emu"])
def test_linear_cross_entropy_filter_keeps_nan(backend):
    x, w, b, t = _lce_inputs("x_nan")
    g = torch.ones(x.shape[0])
    loss, lse, _ = LCE_FWD[backend](x, w, b, t, -100, 0.0, 0.0, 0.0)
    dx, dw, db = LCE_BWD[backend](g, x, w, b, t, lse, -100, 0.0, 0.0, 0.0, 1e-3)
    assert torch.isnan(dx[2]).all() and not torch.isfinite(dw).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_public_function(reduction):
    """The public function (one-pass loss-and-gradient path on CPU) against F.cross_entropy."""
    x, w, b, t = _lce_inputs("x_nan")
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = longtune.linear_cross_entropy(xr, wr, t, b, reduction=reduction)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(xr.grad[2]).all() and (xr.grad[6] == 0).all()
    assert torch.isfinite(xr.grad[[0, 1, 3, 4, 5, 7, 8]]).all() and torch.isnan(wr.grad).any()
    ref = F.cross_entropy(x @ w.T + b, t, reduction=reduction)
    assert torch.isnan(ref)
    # a NaN only in an ignored row: the loss and every gradient stay finite
    x, w, b, t = _lce_inputs("x_ignored_nan")
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = longtune.linear_cross_entropy(xr, wr, t, b, reduction=reduction)
    loss.backward()
    keep = t != -100
    ref = F.cross_entropy(x[keep] @ w.T + b, t[keep], reduction=reduction)
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(wr.grad).all() and (xr.grad[6] == 0).all()


def test_chunked_lm_head_propagates_nan():
    from longtune.nn import ChunkedLMHead

    head = ChunkedLMHead(torch.nn.Linear(16, 50))
    h = torch.randn(2, 7, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    hn = h.detach().clone()
    hn[1, 3, 2] = NAN
    hn.requires_grad_()
    loss = head(hn, labels, reduction="none")
    assert (
        torch.isnan(loss[1, 3])
        and torch.isfinite(loss[0]).all()
        and torch.isfinite(loss[1, :3]).all()
    )
    total = head(hn, labels)
    assert torch.isnan(total)
    total.backward()
    assert torch.isnan(hn.grad[1, 3]).all() and torch.isfinite(hn.grad[0]).all()


# ------------------------------------------------------------------------------ Hadamard
HAD = {"cpu": L.hadamard_transform, "emu": emulated("hadamard_transform")}


@pytest.mark.parametrize("backend", ["cpu", "emu"])
@pytest.mark.parametrize("n", [64, 48, 1024])
@pytest.mark.parametrize("val", [NAN, INF])
def test_hadamard_spreads_over_the_row(backend, n, val):
    x = torch.randn(4, n)
    x[1, 5] = val
    y = HAD[backend](x, 1 / math.sqrt(n))
    ref = RH.hadamard_transform(x.double(), 1 / math.sqrt(n))
    same_pattern(y, ref, f"{backend} hadamard {n}")
    assert not torch.isfinite(y[1]).any() and torch.isfinite(y[[0, 2, 3]]).all()


# ------------------------------------------------------------------------------ quantization
QFQ = {"cpu": L.rotate_fake_quant, "emu": emulated("rotate_fake_quant")}
QCODES = {"cpu": L.rotate_quantize, "emu": emulated("rotate_quantize")}


@pytest.mark.parametrize("backend", ["cpu", "emu"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("val", [NAN, INF, -INF])
def test_quant_pattern(backend, sym, rotate, val):
    x = torch.randn(3, 64)
    x[1, 5] = val
    x[2, 40] = val
    args = (4, "per_group", 16, sym, 1.0, rotate, 0, "identity")
    y = QFQ[backend](x, *args)
    ref = RQ.rotate_fake_quant(x, 4, "per_group", 16, sym, 1.0, rotate_input=rotate)
    same_pattern(y, ref, f"{backend} fake_quant")
    assert torch.isfinite(y[0]).all()
    codes, scales, zeros = QCODES[backend](x, *args[:-1])
    r = RQ.rotate(x, None) if rotate else x
    _, rs, rz = RQ.quantize(r, 4, "per_group", 16, sym, 1.0)
    same_pattern(scales, rs, f"{backend} scales")
    same_pattern(zeros, rz, f"{backend} zeros")
    # dequantize(quantize(x)) is non-finite exactly where the fake quantizer is
    deq = longtune.ops.quant.dequantize(codes, scales, zeros)
    assert torch.equal(torch.isfinite(deq), torch.isfinite(y))


@pytest.mark.parametrize("backend", ["cpu", "emu"])
def test_quant_nan_group_is_nan(backend):
    x = torch.randn(2, 64)
    x[0, 17] = NAN
    y = QFQ[backend](x, 4, "per_group", 16, True, 1.0, False, 0, "identity")
    assert torch.isnan(y[0, 16:32]).all()
    assert (
        torch.isfinite(y[0, :16]).all()
        and torch.isfinite(y[0, 32:]).all()
        and torch.isfinite(y[1]).all()
    )


def test_quantize_weight_and_module_propagate_nan():
    w = torch.randn(8, 32)
    w[3, 4] = NAN
    wq = longtune.ops.quant.quantize_weight(w, bits=4, group_size=16)
    assert torch.isnan(wq[3, :16]).all() and torch.isfinite(wq[3, 16:]).all()
    from longtune.nn import RotatedQuantLinear

    m = RotatedQuantLinear(64, 16, weight_group_size=16)
    x = torch.randn(3, 64)
    x[1, 0] = NAN
    y = m(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    m.weight.data[2, 7] = NAN  # a NaN weight: that output channel, for every token
    y = m(torch.randn(3, 64))
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, [0, 1, 3]]).all()


# ------------------------------------------------------------------------------ sparse deltas
SDG = {"cpu": L.sparse_delta_grad, "emu": emulated("sparse_delta_grad")}
ADAMW = {"cpu": L.sparse_adamw_, "emu": emulated("sparse_adamw_")}


@pytest.mark.parametrize("backend", ["cpu", "emu"])
@pytest.mark.parametrize("val", [NAN, INF])
def test_sparse_delta_grad_pattern(backend, val):
    g, x = torch.randn(33, 8), torch.randn(33, 6)
    idx = torch.tensor([0, 5, 13, 17, 30, 47])
    g[2, 2] = val  # weight row 2: indices 12..17
    x[3, 0] = val  # input column 0: indices 0, 30
    out = SDG[backend](g, x, idx, 6)
    same_pattern(out, RSD.sparse_delta_grad(g, x, idx, 6), f"{backend} sparse_delta_grad")
    assert torch.isfinite(out[[1, 5]]).all() and not torch.isfinite(out[[0, 2, 3, 4]]).any()


@pytest.mark.parametrize("backend", ["cpu", "emu"])
@pytest.mark.parametrize("val", [NAN, INF])
def test_sparse_adamw_pattern(backend, val):
    v0 = torch.randn(7)
    gr = torch.randn(7)
    gr[2] = val
    v, m, s = v0.clone(), torch.zeros(7), torch.zeros(7)
    ADAMW[backend](v, gr, m, s, torch.zeros(7, dtype=torch.int32), 1e-3, 0.9, 0.999, 1e-8, 0.01)
    p = torch.nn.Parameter(v0.clone())
    p.grad = gr.clone()
    torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01).step()
    same_pattern(v, p.data, f"{backend} adamw", atol=1e-6, rtol=1e-5)


def test_sparse_delta_linear_forward_propagates_nan():
    from longtune.nn import SparseDeltaLinear

    m = SparseDeltaLinear(torch.nn.Linear(16, 8), num_deltas=10, seed=0)
    x = torch.randn(3, 16)
    x[2, 1] = NAN
    y = m(x)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[:2]).all()
    with torch.no_grad():
        m.values[0] = NAN  # a NaN delta: its output channel, for every token
    y = m(torch.randn(3, 16))
    r = int(m.indices[0]) // 16
    assert (
        torch.isnan(y[:, r]).all() and torch.isfinite(y[:, [c for c in range(8) if c != r]]).all()
    )
