"""Shared cases of the fused linear + cross-entropy device kernels (emulated and real CUDA):
forward (loss rows, lse, argmax) and backward (dx, dweight, dbias) against the float64 reference
(`linear_cross_entropy_rows` + autograd, random per-row loss gradient), 2x rule per output; the
argmax holds a largest logit of the float64 reference (up to the dtype's rounding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longtune.reference.cross_entropy import linear_cross_entropy_rows, linear_logits
from longtune.testing import assert_within_2x


@dataclass(frozen=True)
class Case:
    T: int
    V: int
    d: int
    bias: bool = False
    ignore: str = "none"  # "none" | "some" | "all"
    eps: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0
    ignore_index: int = -100
    class_weight: bool = False

    def __str__(self):
        s = f"T{self.T}-V{self.V}-d{self.d}"
        if self.bias:
            s += "-bias"
        if self.ignore != "none":
            s += f"-ign{self.ignore}{self.ignore_index}"
        if self.eps:
            s += f"-ls{self.eps}"
        if self.z_loss:
            s += f"-z{self.z_loss}"
        if self.softcap:
            s += f"-cap{self.softcap}"
        if self.class_weight:
            s += "-cw"
        return s


CASES = [
    Case(7, 50, 24),
    Case(13, 70, 40, bias=True, ignore="some", eps=0.1),
    Case(5, 33, 17, z_loss=1e-2, softcap=3.0),
    Case(1, 65, 1, bias=True),
    Case(4, 20, 8, bias=True, ignore="all"),
    Case(20, 70, 40, bias=True, ignore="some", eps=0.2, z_loss=1e-3, softcap=4.0, ignore_index=3),
    Case(13, 70, 40, bias=True, ignore="some", eps=0.1, z_loss=1e-3, class_weight=True),
    Case(9, 33, 17, class_weight=True),
]
GPU_CASES = [
    Case(300, 5000, 256, bias=True, ignore="some", eps=0.1, z_loss=1e-4, softcap=15.0),
    Case(1000, 32000, 128),
    Case(77, 1031, 97, bias=True, z_loss=1e-3),  # odd sizes everywhere
    Case(513, 4099, 1, ignore="some", ignore_index=0),
    Case(300, 5000, 256, bias=True, ignore="some", eps=0.1, z_loss=1e-4, class_weight=True),
]


def make_inputs(c: Case, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c.T, c.d, generator=g)
    w = torch.randn(c.V, c.d, generator=g) / max(1.0, c.d**0.5) * 2
    b = torch.randn(c.V, generator=g) if c.bias else None
    target = torch.randint(0, c.V, (c.T,), generator=g)
    if c.ignore == "some":
        target[torch.rand(c.T, generator=g) < 0.3] = c.ignore_index
        target[0] = c.ignore_index
    elif c.ignore == "all":
        target[:] = c.ignore_index
    grad = torch.rand(c.T, generator=g) + 0.5
    conv = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return conv(x), conv(w), conv(b), target.to(device), grad.to(device)


def class_weight(c: Case, device, seed=1):
    """Positive class weights in [0.25, 2) (None unless the case asks for them), float32."""
    if not c.class_weight:
        return None
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(c.V, generator=g) * 1.75 + 0.25).to(device)


def reference(c: Case, x, w, b, target, grad, dtype):
    """Loss rows, lse and (dx, dw, db) of the PyTorch reference computed in `dtype`."""
    xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    bs = None if b is None else b.to(dtype).requires_grad_()
    cw = class_weight(c, x.device)
    loss, lse = linear_cross_entropy_rows(
        xs,
        ws,
        target,
        bs,
        ignore_index=c.ignore_index,
        label_smoothing=c.eps,
        z_loss=c.z_loss,
        softcap=c.softcap or None,
        class_weight=None if cw is None else cw.to(dtype),
    )
    (loss * grad.to(dtype)).sum().backward()
    return loss.detach(), lse.detach(), xs.grad, ws.grad, None if bs is None else bs.grad


def run_op(fwd, bwd, c: Case, x, w, b, target, grad, filter_eps=0.0):
    """(loss, lse, dx, dw, db, argmax) from the forward op then the backward op."""
    cw = class_weight(c, x.device)
    loss, lse, amax = fwd(x, w, b, target, c.ignore_index, c.eps, c.z_loss, c.softcap, cw)
    dx, dw, db = bwd(
        grad, x, w, b, target, lse, c.ignore_index, c.eps, c.z_loss, c.softcap, filter_eps, cw
    )
    return loss, lse, dx, dw, db, amax


def check_case(fwd, bwd, device, c: Case, dtype, seed=0):
    x, w, b, target, grad = make_inputs(c, dtype, device, seed)
    _check_outputs(c, dtype, x, w, b, target, grad, run_op(fwd, bwd, c, x, w, b, target, grad))


def check_case_fused(fwd_bwd, device, c: Case, dtype, seed=0):
    """linear_cross_entropy_fwd_bwd (loss, lse and the gradients of sum grad * loss in one call)."""
    x, w, b, target, grad = make_inputs(c, dtype, device, seed)
    outs = fwd_bwd(
        x,
        w,
        b,
        target,
        grad.float(),
        c.ignore_index,
        c.eps,
        c.z_loss,
        c.softcap,
        True,
        class_weight(c, x.device),
    )
    _check_outputs(c, dtype, x, w, b, target, grad, outs)


def check_argmax(amax, x, w, b, c: Case, dtype):
    """amax (int64 per row) picks a largest logit of the float64 reference, up to what the
    dtype's rounding of the logits can reorder."""
    cpu = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    z = linear_logits(cpu(x), cpu(w), cpu(b), softcap=c.softcap or None)
    amax = amax.cpu()
    assert amax.dtype == torch.int64 and amax.shape == (c.T,)
    tol = (8 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5) * (
        1 + z.abs().max().item()
    )
    assert torch.all((amax >= 0) & (amax < c.V))
    picked = z.gather(1, amax[:, None])[:, 0]
    assert torch.all(picked >= z.max(1).values - tol), f"{c} {dtype}: argmax is not a largest logit"


def _check_outputs(c: Case, dtype, x, w, b, target, grad, outs):
    loss, lse, dx, dw, db, amax = outs
    check_argmax(amax, x, w, b, c, dtype)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    assert dx.dtype == dtype and dw.dtype == dtype
    r64 = reference(c, x, w, b, target, grad, torch.float64)
    rdt = reference(c, x, w, b, target, grad, dtype)
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    # loss / lse are float32 outputs: PyTorch's same-dtype result, compared as float32
    assert_within_2x(cpu(loss), cpu(r64[0]).float(), cpu(rdt[0]).float(), f"{c} {dtype} loss")
    assert_within_2x(cpu(lse), cpu(r64[1]).float(), cpu(rdt[1]).float(), f"{c} {dtype} lse")
    valid = (target != c.ignore_index).cpu()
    assert torch.all(cpu(loss)[~valid] == 0)
    for name, out, ref, same in [("dx", dx, r64[2], rdt[2]), ("dweight", dw, r64[3], rdt[3])]:
        assert_within_2x(cpu(out), cpu(ref).to(dtype), cpu(same), f"{c} {dtype} {name}")
    if b is None:
        assert db.numel() == 0
    else:
        assert db.dtype == dtype
        assert_within_2x(cpu(db), cpu(r64[4]).to(dtype), cpu(rdt[4]), f"{c} {dtype} dbias")
    if c.ignore == "all":
        assert torch.all(cpu(dx) == 0) and torch.all(cpu(dw) == 0) and torch.all(cpu(loss) == 0)


def check_filter(fwd, bwd, device, c: Case, dtype):
    """filter_eps: a tiny threshold gives the exact result; a large one skips everything (zeros)."""
    x, w, b, target, grad = make_inputs(c, dtype, device)
    exact = run_op(fwd, bwd, c, x, w, b, target, grad, 0.0)
    tiny = run_op(fwd, bwd, c, x, w, b, target, grad, 1e-30)
    for e, t in zip(exact[2:5], tiny[2:5]):
        torch.testing.assert_close(t, e, rtol=1e-5, atol=1e-6)
    small = run_op(fwd, bwd, c, x, w, b, target, grad, 1e-4)
    for e, t in zip(exact[2:5], small[2:5]):
        torch.testing.assert_close(t.float(), e.float(), rtol=0, atol=2e-3 * max(1, c.V // 64))
    huge = run_op(fwd, bwd, c, x, w, b, target, grad, 1e30)
    for t in huge[2:5]:
        assert torch.all(t == 0)


def check_empty(fwd, bwd, device, dtype):
    x = torch.randn(0, 8, dtype=dtype, device=device)
    w = torch.randn(10, 8, dtype=dtype, device=device)
    b = torch.randn(10, dtype=dtype, device=device)
    t = torch.zeros(0, dtype=torch.long, device=device)
    loss, lse, amax = fwd(x, w, b, t, -100, 0.0, 0.0, 0.0)
    assert (
        loss.shape == (0,)
        and lse.shape == (0,)
        and amax.shape == (0,)
        and amax.dtype == torch.int64
    )
    dx, dw, db = bwd(loss, x, w, b, t, lse, -100, 0.0, 0.0, 0.0, 0.0)
    assert dx.shape == (0, 8) and dw.shape == (10, 8) and db.shape == (10,)
    assert torch.all(dw == 0) and torch.all(db == 0)


def check_errors(fwd, bwd, device):
    import pytest

    x = torch.randn(3, 8, device=device)
    w = torch.randn(10, 8, device=device)
    t = torch.tensor([1, 10, 2], device=device)
    with pytest.raises(
        RuntimeError, match=r"linear_cross_entropy_fwd: target\[1\] = 10 is out of range"
    ):
        fwd(x, w, None, t, -100, 0.0, 0.0, 0.0)
    t = torch.tensor([1, -5, 2], device=device)
    with pytest.raises(RuntimeError, match=r"target\[1\] = -5 is out of range"):
        bwd(
            torch.ones(3, device=device),
            x,
            w,
            None,
            t,
            torch.zeros(3, device=device),
            -100,
            0.0,
            0.0,
            0.0,
            0.0,
        )
    t = torch.tensor([1, 2, 3], device=device)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        fwd(x, w.half(), None, t, -100, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        fwd(x.double(), w.double(), None, t, -100, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="lse must be"):
        bwd(
            torch.ones(3, device=device),
            x,
            w,
            None,
            t,
            torch.zeros(2, device=device),
            -100,
            0.0,
            0.0,
            0.0,
            0.0,
        )
    with pytest.raises(RuntimeError, match="filter_eps must be >= 0"):
        bwd(
            torch.ones(3, device=device),
            x,
            w,
            None,
            t,
            torch.zeros(3, device=device),
            -100,
            0.0,
            0.0,
            0.0,
            -1.0,
        )
    with pytest.raises(RuntimeError, match=r"class_weight must have shape \(vocab,\) = \(10,\)"):
        fwd(x, w, None, t, -100, 0.0, 0.0, 0.0, torch.ones(9, device=device))
    with pytest.raises(RuntimeError, match="class_weight must be a floating tensor"):
        bwd(
            torch.ones(3, device=device),
            x,
            w,
            None,
            t,
            torch.zeros(3, device=device),
            -100,
            0.0,
            0.0,
            0.0,
            0.0,
            torch.ones(10, dtype=torch.long, device=device),
        )
