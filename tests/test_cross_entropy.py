"""Fused linear + cross-entropy on CPU vs F.cross_entropy on materialised logits (loss and every
gradient, every option), gradcheck, opcheck, compile, memory, bad input."""

import pytest
import torch
import torch.nn.functional as F

import longtune
from longtune.reference.cross_entropy import linear_cross_entropy as ref_lce
from longtune.testing import assert_within_2x

from . import cross_entropy_cases as C


def _data(T, d, V, dtype=torch.float64, bias=True, ignore_frac=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w = torch.randn(V, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (T,), generator=g)
    t[torch.rand(T, generator=g) < ignore_frac] = -100
    conv = lambda z: None if z is None else z.to(dtype).requires_grad_()  # noqa: E731
    return conv(x), conv(w), conv(b), t


def _torch(x, w, b, t, reduction="mean", eps=0.0, zl=0.0, cap=None):
    logits = x @ w.T + (b if b is not None else 0)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    loss = F.cross_entropy(logits, t, reduction="none", label_smoothing=eps)
    if zl:
        lse = torch.logsumexp(logits, -1)
        loss = loss + torch.where(t != -100, zl * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (t != -100).sum().clamp(min=1)


OPTIONS = [dict(), dict(eps=0.1), dict(zl=1e-3), dict(cap=3.0), dict(eps=0.05, zl=1e-4, cap=5.0)]


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_f_cross_entropy_float64(opts, reduction, bias):
    x, w, b, t = _data(37, 24, 1100, bias=bias)  # V not a multiple of the tile
    kw = dict(
        label_smoothing=opts.get("eps", 0.0), z_loss=opts.get("zl", 0.0), softcap=opts.get("cap")
    )
    got = longtune.linear_cross_entropy(x, w, t, b, reduction=reduction, **kw)
    want = _torch(x, w, b, t, reduction, **opts)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    gout = torch.randn_like(want)
    params = [p for p in (x, w, b) if p is not None]
    g1 = torch.autograd.grad(got, params, gout)
    g2 = torch.autograd.grad(want, params, gout)
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_2x_rule_low_precision(dtype):
    x64, w64, b64, t = _data(64, 48, 2100)
    want = ref_lce(x64, w64, t, b64)
    gw = torch.autograd.grad(want, (x64, w64, b64))
    x, w, b = (z.detach().to(dtype).requires_grad_() for z in (x64, w64, b64))
    got = longtune.linear_cross_entropy(x, w, t, b)
    g = torch.autograd.grad(got, (x, w, b))
    xr, wr, br = (z.detach().to(dtype).requires_grad_() for z in (x64, w64, b64))
    same = ref_lce(xr, wr, t, br)
    gs = torch.autograd.grad(same, (xr, wr, br))
    assert_within_2x(got, want, same, "loss")
    for name, a, e, s in zip(("dx", "dw", "db"), g, gw, gs):
        assert_within_2x(a, e, s, name)
    assert g[1].dtype == dtype


def test_all_ignored_and_single_row_and_none_with_ignored():
    x, w, b, t = _data(5, 8, 30)
    t[:] = -100
    with pytest.warns(UserWarning, match="every target is ignore_index"):
        loss = longtune.linear_cross_entropy(x, w, t, b)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))
    x, w, b, t = _data(1, 8, 30, ignore_frac=0.0)
    torch.testing.assert_close(
        longtune.linear_cross_entropy(x, w, t, b), _torch(x, w, b, t), rtol=1e-10, atol=1e-12
    )
    x, w, b, t = _data(9, 8, 30, ignore_frac=0.5)
    none = longtune.linear_cross_entropy(x, w, t, b, reduction="none")
    assert torch.equal(none[t == -100], torch.zeros_like(none[t == -100]))  # Liger had this wrong
    g = torch.randn(9, dtype=torch.float64)
    (gx,) = torch.autograd.grad(none, x, g)
    (wx,) = torch.autograd.grad(_torch(x, w, b, t, "none"), x, g)
    torch.testing.assert_close(gx, wx, rtol=1e-9, atol=1e-12)


def test_rows_selection_and_leading_dims():
    x, w, b, t = _data(24, 8, 50, ignore_frac=0.0)
    x3, t3 = x.view(2, 12, 8), t.view(2, 12)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 7:] = True  # answers only: prompts cost nothing
    got = longtune.linear_cross_entropy(x3, w, t3, b, rows=mask)
    sel = mask.reshape(-1)
    want = _torch(x[sel], w, b, t[sel])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.backward()
    assert torch.equal(x.grad[~sel], torch.zeros_like(x.grad[~sel]))
    assert longtune.linear_cross_entropy(x3, w, t3, b, reduction="none").shape == (2, 12)


def test_filter_is_opt_in_and_close():
    x, w, b, t = _data(32, 16, 3000, ignore_frac=0.0)
    exact = torch.autograd.grad(longtune.linear_cross_entropy(x, w, t, b), (x, w))
    filt = torch.autograd.grad(longtune.linear_cross_entropy(x, w, t, b, filter_eps=1e-12), (x, w))
    for a, e in zip(filt, exact):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-9)
    coarse = torch.autograd.grad(longtune.linear_cross_entropy(x, w, t, b, filter_eps=10.0), (x, w))
    assert torch.equal(coarse[1], torch.zeros_like(coarse[1]))  # every tile filtered


def test_gradcheck():
    x, w, b, t = _data(6, 5, 1030)
    fn = lambda x, w, b: longtune.linear_cross_entropy(
        x, w, t, b, label_smoothing=0.1, z_loss=1e-2, softcap=4.0
    )  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_opcheck_and_compile():
    x, w, b, t = _data(10, 8, 40, dtype=torch.float32)
    args = (x, w, b, t, -100, 0.1, 1e-3, 0.0)
    torch.library.opcheck(torch.ops.longtune.linear_cross_entropy_fwd, args)
    loss, lse, _ = torch.ops.longtune.linear_cross_entropy_fwd(*args)
    g = torch.randn_like(loss)
    torch.library.opcheck(
        torch.ops.longtune.linear_cross_entropy_bwd,
        (g, x.detach(), w.detach(), b.detach(), t, lse, -100, 0.1, 1e-3, 0.0, 0.0),
    )

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w, b):
        return longtune.linear_cross_entropy(x, w, t, b, reduction="sum")

    torch.testing.assert_close(
        f(x, w, b), longtune.linear_cross_entropy(x, w, t, b, reduction="sum")
    )


FWD_BWD = torch.ops.longtune.linear_cross_entropy_fwd_bwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "case",
    C.CASES + [C.Case(300, 70, 24, bias=True, ignore="some", eps=0.1, z_loss=1e-3, softcap=5.0)],
    ids=str,
)
def test_fwd_bwd_one_pass(case, dtype):
    # the CPU one-pass kernel (logits of a row block formed once, turned into d logits in place);
    # T = 300 spans two row blocks
    C.check_case_fused(FWD_BWD, "cpu", case, dtype)


def test_fwd_bwd_equals_fwd_then_bwd_float64_and_opcheck():
    c = C.Case(37, 1100, 19, bias=True, ignore="some", eps=0.1, z_loss=1e-2, softcap=6.0)
    x, w, b, t, g = C.make_inputs(c, torch.float64, "cpu")
    opts = (c.ignore_index, c.eps, c.z_loss, c.softcap)
    one = FWD_BWD(x, w, b, t, g.double(), *opts)
    loss, lse, amax = torch.ops.longtune.linear_cross_entropy_fwd(x, w, b, t, *opts)
    two = (loss, lse) + tuple(
        torch.ops.longtune.linear_cross_entropy_bwd(g.double(), x, w, b, t, lse, *opts, 0.0)
    )
    two = two + (amax,)
    for a, r in zip(one, two):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(FWD_BWD, (x.float(), w.float(), b.float(), t, g.float(), *opts))
    with pytest.raises(RuntimeError, match="grad_rows must be"):
        FWD_BWD(x, w, b, t, g.double()[:-1], *opts)
    with pytest.raises(RuntimeError, match="grad_rows must be"):
        FWD_BWD(x, w, b, t, g.float(), *opts)


@pytest.mark.parametrize(
    "op", [FWD_BWD, torch.ops.longtune_emu.linear_cross_entropy_fwd_bwd], ids=["cpu", "emulated"]
)
def test_fwd_bwd_without_weight_grad(op):
    c = C.Case(9, 70, 16, bias=True, ignore="some", eps=0.1)
    x, w, b, t, g = C.make_inputs(c, torch.float32, "cpu")
    opts = (c.ignore_index, c.eps, c.z_loss, c.softcap)
    full = op(x, w, b, t, g.float(), *opts)
    frozen = op(x, w, b, t, g.float(), *opts, False)
    for a, r in zip(frozen[:3], full[:3]):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)
    assert frozen[3].numel() == 0 and frozen[4].numel() == 0
    if op is FWD_BWD:  # the emulator's mirror library has no fake kernels
        torch.library.opcheck(op, (x, w, b, t, g.float(), *opts, False))


def test_fwd_bwd_fp32_grads():
    # fp32_grads: the gradients in the compute dtype, not rounded to the inputs' (bfloat16) dtype
    c = C.Case(9, 70, 16, bias=True, ignore="some", eps=0.1)
    x, w, b, t, g = C.make_inputs(c, torch.bfloat16, "cpu")
    opts = (c.ignore_index, c.eps, c.z_loss, c.softcap)
    rounded = FWD_BWD(x, w, b, t, g.float(), *opts)
    full = FWD_BWD(x, w, b, t, g.float(), *opts, True, None, True)
    for r, f in zip(rounded[2:5], full[2:5]):
        assert r.dtype == torch.bfloat16 and f.dtype == torch.float32
        assert torch.equal(f.to(torch.bfloat16), r)
    torch.library.opcheck(FWD_BWD, (x, w, b, t, g.float(), *opts, True, None, True))


def test_frozen_head_gets_no_weight_gradient():
    x, w, b, t = _data(30, 16, 200)
    w.requires_grad_(False)
    b.requires_grad_(False)
    seen = _ops_called(lambda: longtune.linear_cross_entropy(x, w, t, b).backward())
    assert "longtune.linear_cross_entropy_fwd_bwd" in seen
    assert w.grad is None and b.grad is None
    xr = x.detach().clone().requires_grad_()
    _torch(xr, w, b, t).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)


def _ops_called(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Log():
        fn()
    return seen


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mean_and_sum_take_the_one_pass_path_on_cpu(reduction):
    x, w, b, t = _data(40, 16, 300)
    g = torch.tensor(0.37, dtype=torch.float64)  # a non-unit incoming gradient: backward scales

    def step():
        loss = longtune.linear_cross_entropy(x, w, t, b, reduction=reduction, label_smoothing=0.1)
        loss.backward(g)

    seen = _ops_called(step)
    assert (
        "longtune.linear_cross_entropy_fwd_bwd" in seen
        and "longtune.linear_cross_entropy_bwd" not in seen
    )
    got = (x.grad, w.grad, b.grad)
    for p in (x, w, b):
        p.grad = None
    xr, wr, br = (p.detach().clone().requires_grad_() for p in (x, w, b))
    _torch(xr, wr, br, t, reduction=reduction, eps=0.1).backward(g)
    for a, r in zip(got, (xr.grad, wr.grad, br.grad)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    # without grad, and for reduction="none", the forward-only kernel runs (no gradient computed)
    with torch.no_grad():
        assert "longtune.linear_cross_entropy_fwd_bwd" not in _ops_called(
            lambda: longtune.linear_cross_entropy(x, w, t, b, reduction=reduction)
        )
    assert "longtune.linear_cross_entropy_fwd_bwd" not in _ops_called(
        lambda: longtune.linear_cross_entropy(x, w, t, b, reduction="none").sum().backward()
    )


def test_peak_memory_does_not_grow_with_vocabulary():
    """Peak bytes allocated by a training step, counted at the allocator (profiler allocation
    events, exact and repeatable, unlike the process's RSS): the fused op never holds T x V
    logits."""
    from benchmarks import harness as H

    T, d, V = 2048, 64, 32768
    x = torch.randn(T, d, requires_grad=True)
    w = torch.randn(V, d, requires_grad=True)
    t = torch.randint(0, V, (T,))
    w.grad, x.grad = (
        torch.zeros_like(w),
        torch.zeros_like(x),
    )  # the gradients themselves are not extra

    def fused():
        longtune.linear_cross_entropy(x, w, t).backward()

    def naive():
        torch.nn.functional.cross_entropy(x @ w.T, t).backward()

    logits = T * V * 4
    f, n = H.peak_memory(fused, "cpu")["bytes"], H.peak_memory(naive, "cpu")["bytes"]
    assert n >= logits  # the measurement sees the naive path's logits
    assert 0 < f < n / 8, (f, n)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(reduction="avg"), "reduction must be"),
        (dict(filter_eps=-1.0), "filter_eps must be"),
    ],
)
def test_bad_python_args(kw, match):
    x, w, b, t = _data(4, 8, 20)
    with pytest.raises(ValueError, match=match):
        longtune.linear_cross_entropy(x, w, t, b, **kw)


def test_bad_tensors():
    x, w, b, t = _data(4, 8, 20)
    t2 = t.clone()
    t2[2] = 20
    with pytest.raises(
        RuntimeError, match=r"target\[2\] = 20 is out of range for a vocabulary of 20"
    ):
        longtune.linear_cross_entropy(x, w, t2, b)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        longtune.linear_cross_entropy(x, w.float(), t, b)
    with pytest.raises(RuntimeError, match="hidden size"):
        longtune.linear_cross_entropy(x, w[:, :4], t, b)
    with pytest.raises(ValueError, match="target shape"):
        longtune.linear_cross_entropy(x, w, t[:3], b)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        longtune.linear_cross_entropy(x, w, t, b[:5])
    with pytest.raises(RuntimeError, match="label_smoothing must be in"):
        longtune.linear_cross_entropy(x, w, t, b, label_smoothing=1.5)
    with pytest.raises(RuntimeError, match="target must be an int64"):
        longtune.linear_cross_entropy(x, w, t.int(), b)


def test_chunked_lm_head_module():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 50, dtype=torch.float64)
    head = longtune.nn.ChunkedLMHead(lin, label_smoothing=0.1)
    h = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[1, :3] = -100
    torch.testing.assert_close(head(h), lin(h))  # no labels: logits
    loss = head(h, labels)
    want = F.cross_entropy(
        lin(h)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), label_smoothing=0.1
    )
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(loss, (h, lin.weight))
    g2 = torch.autograd.grad(want, (h, lin.weight))
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        longtune.nn.ChunkedLMHead(torch.nn.Embedding(3, 4))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_lm_head_class_weight_and_extras(smoothing, reduction):
    # class weights and the logged extras reach the fused loss through the module: the loss and
    # its gradients equal F.cross_entropy(weight=...) on the shifted logits (float64), and
    # z-loss / accuracy / predictions equal what the materialised logits give
    torch.manual_seed(1)
    V, zc = 37, 1e-3
    lin = torch.nn.Linear(16, V, dtype=torch.float64)
    cw = torch.rand(V, dtype=torch.float64) + 0.25
    head = longtune.nn.ChunkedLMHead(lin, label_smoothing=smoothing, z_loss=zc, class_weight=cw)
    assert torch.equal(head.class_weight, cw) and "class_weight" in head.state_dict()
    h = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (2, 11))
    labels[0, 4:7] = -100
    out = head(
        h,
        labels,
        reduction=reduction,
        return_z_loss=True,
        return_accuracy=True,
        return_predictions=True,
    )
    assert isinstance(out, longtune.LinearCrossEntropyOutput)
    logits = lin(h)[:, :-1]
    tgt = labels[:, 1:]
    ce = F.cross_entropy(
        logits.reshape(-1, V),
        tgt.reshape(-1),
        weight=cw,
        label_smoothing=smoothing,
        reduction="none",
    )
    keep = tgt.reshape(-1) != -100
    lse = torch.logsumexp(logits.reshape(-1, V), -1)
    z = zc * lse.square() * keep
    if reduction == "mean":
        want = ce.sum() / cw[tgt.reshape(-1)[keep]].sum() + z.sum() / keep.sum()
        want_z = z.sum() / keep.sum()
    elif reduction == "sum":
        want, want_z = ce.sum() + z.sum(), z.sum()
    else:
        want, want_z = (ce + z).reshape(tgt.shape), z.reshape(tgt.shape)
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.z_loss, want_z, rtol=1e-10, atol=1e-14)
    pred = logits.argmax(-1)
    assert torch.equal(out.predictions, pred)
    acc = (pred == tgt)[tgt != -100].double().mean()
    torch.testing.assert_close(out.accuracy.double(), acc)
    seed = torch.randn_like(want)
    g1 = torch.autograd.grad(out.loss, (h, lin.weight, lin.bias), seed)
    g2 = torch.autograd.grad(want, (h, lin.weight, lin.bias), seed)
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
    # the buffer follows the module and its state_dict
    h2 = longtune.nn.ChunkedLMHead(torch.nn.Linear(16, V, dtype=torch.float64), class_weight=cw * 0)
    h2.load_state_dict(head.state_dict())
    assert torch.equal(h2.class_weight, cw)


def test_chunked_lm_head_refuses_a_bad_class_weight():
    lin = torch.nn.Linear(8, 10)
    with pytest.raises(ValueError, match=r"class_weight must be a tensor of shape \(10,\)"):
        longtune.nn.ChunkedLMHead(lin, class_weight=torch.ones(9))
    with pytest.raises(ValueError, match=r"class_weight must be a tensor of shape"):
        longtune.nn.ChunkedLMHead(lin, class_weight=[1.0] * 10)
    with pytest.raises(ValueError, match="class_weight must be floating point"):
        longtune.nn.ChunkedLMHead(lin, class_weight=torch.ones(10, dtype=torch.long))


@pytest.mark.parametrize("gval", [0.37, 1024.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_scaled_backward_rounds_once(dtype, reduction, gval):
    """An incoming gradient other than 1 (loss scaling, accumulation, loss * k): the gradients are
    scaled in float32 and rounded to the input dtype once -- within the 2x rule and as accurate as
    the float64 gradient rounded to the dtype (rounding before the scaling gives up to twice
    that)."""
    from longtune.testing import max_abs_err

    x64, w64, b64, t = _data(64, 48, 2100)
    x64, w64, b64 = (
        z.detach().to(dtype).double().requires_grad_() for z in (x64, w64, b64)
    )  # same inputs
    g = torch.tensor(gval, dtype=dtype)
    want = torch.autograd.grad(
        ref_lce(x64, w64, t, b64, reduction=reduction), (x64, w64, b64), g.double()
    )
    x, w, b = (z.detach().to(dtype).requires_grad_() for z in (x64, w64, b64))
    got = torch.autograd.grad(
        longtune.linear_cross_entropy(x, w, t, b, reduction=reduction), (x, w, b), g
    )
    xr, wr, br = (z.detach().to(dtype).requires_grad_() for z in (x64, w64, b64))
    same = torch.autograd.grad(ref_lce(xr, wr, t, br, reduction=reduction), (xr, wr, br), g)
    for name, a, e, s in zip(("dx", "dw", "db"), got, want, same):
        assert a.dtype == dtype
        assert_within_2x(a, e, s, name)
        rounded = max_abs_err(e.to(dtype), e)  # the correctly rounded result's error
        assert (
            max_abs_err(a, e)
            <= 1.1 * rounded + 1e-3 * torch.finfo(dtype).eps * e.abs().max().item()
        ), name


def _class_weight(V, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(V, generator=g, dtype=torch.float64) * 1.75 + 0.25


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("path", ["grad", "filtered", "no_grad"])
def test_class_weight_equals_f_cross_entropy_float64(eps, reduction, path):
    """class_weight is F.cross_entropy's weight: weighted rows, weighted smoothing term, "mean"
    divided by the targets' weight sum -- on the one-pass path ("mean" / "sum" with grad), the
    forward + backward ops ("none", filter_eps) and the forward alone (no grad)."""
    x, w, b, t = _data(37, 24, 1100)
    cw = _class_weight(1100)
    kw = dict(reduction=reduction, label_smoothing=eps, class_weight=cw)
    want = F.cross_entropy(x @ w.T + b, t, weight=cw, reduction=reduction, label_smoothing=eps)
    if path == "no_grad":
        with torch.no_grad():
            got = longtune.linear_cross_entropy(x, w, t, b, **kw)
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
        return
    got = longtune.linear_cross_entropy(
        x, w, t, b, filter_eps=1e-300 if path == "filtered" else 0.0, **kw
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    gout = (
        torch.randn_like(want) if reduction == "none" else torch.tensor(0.37, dtype=torch.float64)
    )
    for a, e in zip(
        torch.autograd.grad(got, (x, w, b), gout), torch.autograd.grad(want, (x, w, b), gout)
    ):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weight_with_z_loss_and_softcap(reduction):
    """The z-loss term is not weighted; "mean" averages it over the non-ignored rows (the
    cross-entropy over the targets' weight sum)."""
    x, w, b, t = _data(40, 16, 300)
    cw = _class_weight(300)
    kw = dict(reduction=reduction, label_smoothing=0.05, z_loss=1e-2, softcap=4.0, class_weight=cw)
    got = longtune.linear_cross_entropy(x, w, t, b, **kw)
    want = ref_lce(x, w, t, b, **kw)
    z = x @ w.T + b
    z = 4.0 * torch.tanh(z / 4.0)
    lse = torch.logsumexp(z, -1)
    valid = t != -100
    ce = F.cross_entropy(z, t, weight=cw, reduction=reduction, label_smoothing=0.05)
    zr = torch.where(valid, 1e-2 * lse * lse, torch.zeros_like(lse))
    direct = ce + (
        zr if reduction == "none" else zr.sum() if reduction == "sum" else zr.sum() / valid.sum()
    )
    torch.testing.assert_close(want, direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    gout = torch.randn_like(want)
    for a, e in zip(
        torch.autograd.grad(got, (x, w, b), gout), torch.autograd.grad(want, (x, w, b), gout)
    ):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_class_weight_gradcheck_and_opcheck():
    x, w, b, t = _data(6, 5, 1030)
    cw = _class_weight(1030)
    for reduction in ("mean", "none"):
        fn = lambda x, w, b: longtune.linear_cross_entropy(  # noqa: E731
            x,
            w,
            t,
            b,
            reduction=reduction,
            label_smoothing=0.1,
            z_loss=1e-2,
            softcap=4.0,
            class_weight=cw,
        )
        assert torch.autograd.gradcheck(fn, (x, w, b))
    x, w, b, t = _data(10, 8, 40, dtype=torch.float32)
    x, w, b = x.detach(), w.detach(), b.detach()
    cw = _class_weight(40).float()
    args = (x, w, b, t, -100, 0.1, 1e-3, 0.0, cw)
    torch.library.opcheck(torch.ops.longtune.linear_cross_entropy_fwd, args)
    loss, lse, _ = torch.ops.longtune.linear_cross_entropy_fwd(*args)
    torch.library.opcheck(
        torch.ops.longtune.linear_cross_entropy_bwd,
        (torch.randn_like(loss), x, w, b, t, lse, -100, 0.1, 1e-3, 0.0, 0.0, cw),
    )
    torch.library.opcheck(
        FWD_BWD, (x, w, b, t, torch.rand_like(loss), -100, 0.1, 1e-3, 0.0, True, cw)
    )
    with pytest.raises(ValueError, match=r"class_weight must have shape \(vocab,\) = \(40,\)"):
        longtune.linear_cross_entropy(x, w, t, b, class_weight=cw[:5])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_extras_z_loss_accuracy_predictions(reduction):
    """return_z_loss / return_accuracy / return_predictions: a NamedTuple, computed in the same
    pass; the loss is unchanged (it still includes the z-loss)."""
    x, w, b, t = _data(50, 16, 2100)  # several vocabulary tiles
    with torch.no_grad():  # rows 0 and 1: logits = bias, an exact tie of columns 7 and 3
        x[0] = 0
        x[1] = 0
        b[7] = b[3] = 60.0
    kw = dict(reduction=reduction, z_loss=1e-3, softcap=None)
    plain = longtune.linear_cross_entropy(x, w, t, b, **kw)
    out = longtune.linear_cross_entropy(
        x, w, t, b, return_z_loss=True, return_accuracy=True, return_predictions=True, **kw
    )
    assert isinstance(out, longtune.LinearCrossEntropyOutput)
    torch.testing.assert_close(out.loss, plain, rtol=0, atol=0)
    logits = x @ w.T + b
    pred = logits.argmax(-1)
    assert torch.equal(out.predictions, pred)
    assert out.predictions[0] == 3 and out.predictions[1] == 3
    valid = t != -100
    torch.testing.assert_close(out.accuracy, ((pred == t) & valid).sum().double() / valid.sum())
    lse = torch.logsumexp(logits, -1).detach()
    zr = torch.where(valid, 1e-3 * lse * lse, torch.zeros_like(lse))
    want_z = (
        zr if reduction == "none" else zr.sum() if reduction == "sum" else zr.sum() / valid.sum()
    )
    torch.testing.assert_close(out.z_loss, want_z, rtol=1e-10, atol=1e-12)
    assert not out.z_loss.requires_grad and not out.accuracy.requires_grad
    out.loss.sum().backward()  # the loss is differentiable as before
    assert x.grad is not None
    only = longtune.linear_cross_entropy(x, w, t, b, return_accuracy=True, **kw)
    assert only.z_loss is None and only.predictions is None and only.accuracy is not None


def test_predictions_ties_and_nan_like_torch_argmax():
    x, w, b, t = _data(4, 8, 2100, ignore_frac=0.0)
    with torch.no_grad():
        x.zero_()
        b.zero_()
        b[1500] = b[200] = 5.0  # row ties across tiles: the lower index
        b[7] = 5.0
    with torch.no_grad():
        out = longtune.linear_cross_entropy(x, w, t, b, reduction="none", return_predictions=True)
    assert torch.equal(out.predictions, torch.full((4,), 7))
    with torch.no_grad():  # a NaN logit is the argmax (as torch.argmax), the first NaN
        xn = x.clone()
        wn = w.clone()
        wn[1800] = float("nan")
        wn[1900] = float("nan")
        xn[2] = 1.0
        out = longtune.linear_cross_entropy(xn, wn, t, b, reduction="none", return_predictions=True)
        assert torch.equal(out.predictions, (xn @ wn.T + b).argmax(-1))
        assert out.predictions[2] == 1800 and torch.isnan(out.loss[2])


def test_extras_and_class_weight_compile_fullgraph():
    x, w, b, t = _data(10, 8, 40, dtype=torch.float32)
    cw = _class_weight(40).float()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w, b):
        out = longtune.linear_cross_entropy(
            x,
            w,
            t,
            b,
            reduction="sum",
            z_loss=1e-3,
            class_weight=cw,
            return_z_loss=True,
            return_accuracy=True,
            return_predictions=True,
        )
        return out.loss, out.z_loss, out.accuracy, out.predictions

    got = f(x, w, b)
    want = longtune.linear_cross_entropy(
        x,
        w,
        t,
        b,
        reduction="sum",
        z_loss=1e-3,
        class_weight=cw,
        return_z_loss=True,
        return_accuracy=True,
        return_predictions=True,
    )
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    ga = torch.autograd.grad(got[0], (x, w, b))
    ge = torch.autograd.grad(want.loss, (x, w, b))
    for a, e in zip(ga, ge):
        torch.testing.assert_close(a, e)
