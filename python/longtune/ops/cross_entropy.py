"""Fused linear + cross-entropy: ``torch.ops.longtune.linear_cross_entropy_fwd/_bwd`` (fake kernels,
autograd, FLOPs) and the public ``linear_cross_entropy``. The logits (T x V) are never
materialised; the reference is :mod:`longtune.reference.cross_entropy`."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

_FWD = torch.ops.longtune.linear_cross_entropy_fwd
_BWD = torch.ops.longtune.linear_cross_entropy_bwd
_FWD_BWD = torch.ops.longtune.linear_cross_entropy_fwd_bwd


def _ldt(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("longtune::linear_cross_entropy_fwd")
def _fake_fwd(x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap):
    torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: "longtune.linear_cross_entropy_fwd: x (T, d) and weight (V, d) expected")
    return x.new_empty((x.shape[0],), dtype=_ldt(x)), x.new_empty((x.shape[0],), dtype=_ldt(x))


@torch.library.register_fake("longtune::linear_cross_entropy_bwd")
def _fake_bwd(grad, x, weight, bias, target, lse, ignore_index, label_smoothing, z_loss, softcap, filter_eps):
    db = torch.empty_like(bias) if bias is not None else x.new_empty((0,))
    return torch.empty_like(x), torch.empty_like(weight), db


@torch.library.register_fake("longtune::linear_cross_entropy_fwd_bwd")
def _fake_fwd_bwd(x, weight, bias, target, grad_rows, ignore_index, label_smoothing, z_loss, softcap,
                  weight_grad=True):
    loss, lse = _fake_fwd(x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap)
    dx, dw, db = _fake_bwd(grad_rows, x, weight, bias, target, lse, ignore_index, label_smoothing, z_loss, softcap, 0.0)
    if not weight_grad:
        dw, db = x.new_empty((0,)), x.new_empty((0,))
    return loss, lse, dx, dw, db


class _Fn:
    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, target, *opts = inputs
        _, lse = output
        ctx.save_for_backward(x, weight, bias, target, lse)
        ctx.opts = opts
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        x, weight, bias, target, lse = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None, None, None
        dx, dw, db = _BWD(grad_loss.contiguous(), x, weight, bias, target, lse, *ctx.opts, 0.0)
        return dx, dw, (db if bias is not None else None), None, None, None, None, None


torch.library.register_autograd("longtune::linear_cross_entropy_fwd", _Fn.backward, setup_context=_Fn.setup_context)


@register_flop_formula(torch.ops.longtune.linear_cross_entropy_fwd)
def _flops_fwd(x, weight, *args, out_shape=None, **kwargs) -> int:
    return 2 * x[0] * x[1] * weight[0]


@register_flop_formula(torch.ops.longtune.linear_cross_entropy_bwd)
def _flops_bwd(grad, x, weight, *args, out_shape=None, **kwargs) -> int:
    return 6 * x[0] * x[1] * weight[0]  # logits recomputed, dx, dW


@register_flop_formula(torch.ops.longtune.linear_cross_entropy_fwd_bwd)
def _flops_fwd_bwd(x, weight, *args, out_shape=None, **kwargs) -> int:
    weight_grad = kwargs.get("weight_grad", args[7] if len(args) > 7 else True)
    return (6 if weight_grad else 4) * x[0] * x[1] * weight[0]  # logits, dx[, dW] (CPU: no recompute)


class _GradInForward(torch.autograd.Function):
    """reduction "mean" / "sum" on CPU: the per-row loss weights (1/n or 1) are known before the
    backward, so one pass of ``linear_cross_entropy_fwd_bwd`` returns the loss and the gradients
    (three GEMMs instead of forward + recomputing backward's four); backward scales them by the
    incoming scalar gradient. dx and dW are kept in float32 (float64 for float64 inputs) from forward
    to backward and rounded to the inputs' dtypes once, after the scaling (rounding before it would
    round float16 / bfloat16 gradients twice under loss scaling or ``loss * k``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, opts, n):
        ct = _ldt(x)
        grad_rows = (target != opts[0]).to(ct) / n
        # a frozen head (LoRA, ...): no dW GEMM at all
        weight_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        with torch.no_grad():
            # the CPU kernel computes float16 / bfloat16 in float32 (it converts its inputs): given
            # float32 inputs it returns float32 gradients (a tensor of another dtype than x's is
            # passed as it is, for the op's dtype check)
            up = lambda t: t.to(ct) if t is not None and t.dtype == x.dtype else t  # noqa: E731
            loss, _, dx, dw, db = _FWD_BWD(up(x), up(weight), up(bias), target, grad_rows, *opts, weight_grad)
        ctx.save_for_backward(dx, dw if weight_grad else None, db if bias is not None and weight_grad else None)
        return loss.sum() / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        dx, dw, db = ctx.saved_tensors
        tx, tw, tb = ctx.dtypes
        if float(grad) != 1.0:  # scaled in float32, then rounded once
            g = grad.to(dx.dtype)
            dx, dw, db = (None if t is None else t * g for t in (dx, dw, db))
        return (dx.to(tx), None if dw is None else dw.to(tw), None if db is None else db.to(tb), None, None, None)


class _Filtered(torch.autograd.Function):
    """The opt-in filtered backward (filter_eps > 0) as a plain autograd.Function."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, opts, filter_eps):
        with torch.no_grad():
            loss, lse = _FWD(x, weight, bias, target, *opts)
        ctx.save_for_backward(x, weight, bias, target, lse)
        ctx.opts, ctx.filter_eps = opts, filter_eps
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, target, lse = ctx.saved_tensors
        dx, dw, db = _BWD(grad.contiguous(), x, weight, bias, target, lse, *ctx.opts, ctx.filter_eps)
        return dx, dw, (db if bias is not None else None), None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         *, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: Optional[float] = None, rows: Optional[torch.Tensor] = None,
                         filter_eps: float = 0.0) -> torch.Tensor:
    """``F.cross_entropy(x @ weight.T + bias, target, ...)`` without materialising the logits.

    x (..., d), weight (V, d), bias (V,) or None, target (...) int64 (``ignore_index`` rows count
    nothing). ``reduction``: "mean" (over non-ignored targets; 0 with a warning when every target is
    ignored), "sum" or "none" (per row, 0 for ignored rows). ``label_smoothing`` as in
    F.cross_entropy; ``z_loss``: + z_loss * lse^2 per row (PaLM); ``softcap``: logits
    softcap * tanh(logits / softcap) (Gemma 2). ``rows``: compute only at these positions (an index
    tensor or a bool mask over the flattened tokens; the Long-VITA "logits-masked LM head": prompt
    and padding positions cost nothing) -- "none" then returns the selected rows only.
    ``filter_eps`` > 0: the backward skips vocabulary tiles whose gradient is below it (Cut
    Cross-Entropy's filter; approximate, off by default)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if x.shape[:-1] != target.shape:
        raise ValueError(f"linear_cross_entropy: target shape {tuple(target.shape)} must equal x's leading shape "
                         f"{tuple(x.shape[:-1])}")
    x2 = x.reshape(-1, x.shape[-1])
    t2 = target.reshape(-1)
    if rows is not None:
        rows = rows.reshape(-1)
        if rows.dtype == torch.bool:
            if rows.numel() != t2.numel():
                raise ValueError(f"linear_cross_entropy: a bool rows mask needs {t2.numel()} entries, got {rows.numel()}")
            rows = rows.nonzero().squeeze(1)
        x2, t2 = x2.index_select(0, rows), t2.index_select(0, rows)
    opts = (int(ignore_index), float(label_smoothing), float(z_loss), float(softcap) if softcap else 0.0)
    if filter_eps < 0:
        raise ValueError(f"linear_cross_entropy: filter_eps must be >= 0, got {filter_eps}")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, weight, bias))
    if (reduction != "none" and filter_eps == 0 and needs_grad and x2.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        n = int((t2 != ignore_index).sum()) if reduction == "mean" else 1
        if n > 0:
            return _GradInForward.apply(x2, weight, bias, t2, opts, n).to(x.dtype)
    if filter_eps > 0:
        loss = _Filtered.apply(x2, weight, bias, t2, opts, float(filter_eps))
    else:
        loss, _ = _FWD(x2, weight, bias, t2, *opts)
    out_dtype = x.dtype
    if reduction == "none":
        return loss.to(out_dtype) if rows is not None else loss.view(target.shape).to(out_dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    n = int((t2 != ignore_index).sum())
    if n == 0:
        warnings.warn("linear_cross_entropy: every target is ignore_index; the mean loss is 0", stacklevel=2)
        return (total * 0).to(out_dtype)
    return (total / n).to(out_dtype)
