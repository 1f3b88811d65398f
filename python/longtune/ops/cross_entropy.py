"""Fused linear + cross-entropy: ``torch.ops.longtune.linear_cross_entropy_fwd/_bwd`` (fake kernels,
autograd, FLOPs) and the public ``linear_cross_entropy``. The logits (T x V) are never
materialised; the reference is :mod:`longtune.reference.cross_entropy`."""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

_FWD = torch.ops.longtune.linear_cross_entropy_fwd
_BWD = torch.ops.longtune.linear_cross_entropy_bwd
_FWD_BWD = torch.ops.longtune.linear_cross_entropy_fwd_bwd


def _ldt(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("longtune::linear_cross_entropy_fwd")
def _fake_fwd(
    x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, class_weight=None
):
    torch._check(
        x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
        lambda: "longtune.linear_cross_entropy_fwd: x (T, d) and weight (V, d) expected",
    )
    return (
        x.new_empty((x.shape[0],), dtype=_ldt(x)),
        x.new_empty((x.shape[0],), dtype=_ldt(x)),
        target.new_empty((x.shape[0],)),
    )


@torch.library.register_fake("longtune::linear_cross_entropy_bwd")
def _fake_bwd(
    grad,
    x,
    weight,
    bias,
    target,
    lse,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    filter_eps,
    class_weight=None,
):
    db = torch.empty_like(bias) if bias is not None else x.new_empty((0,))
    return torch.empty_like(x), torch.empty_like(weight), db


@torch.library.register_fake("longtune::linear_cross_entropy_fwd_bwd")
def _fake_fwd_bwd(
    x,
    weight,
    bias,
    target,
    grad_rows,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    weight_grad=True,
    class_weight=None,
    fp32_grads=False,
):
    loss, lse, amax = _fake_fwd(
        x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap
    )
    dx, dw, db = _fake_bwd(
        grad_rows, x, weight, bias, target, lse, ignore_index, label_smoothing, z_loss, softcap, 0.0
    )
    if fp32_grads:  # the compute dtype
        dx, dw, db = (t.to(_ldt(x)) for t in (dx, dw, db))
    if not weight_grad:
        dw, db = x.new_empty((0,)), x.new_empty((0,))
    return loss, lse, dx, dw, db, amax


class _Fn:
    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, target, *opts = inputs
        _, lse, amax = output
        cw = opts[4] if len(opts) > 4 else None
        ctx.save_for_backward(x, weight, bias, target, lse, cw)
        ctx.opts = opts[:4]
        ctx.n_inputs = len(inputs)
        ctx.mark_non_differentiable(lse, amax)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_amax):
        x, weight, bias, target, lse, cw = ctx.saved_tensors
        rest = (None,) * (ctx.n_inputs - 3)  # target, options and class_weight get no gradient
        if grad_loss is None:
            return (None, None, None) + rest
        dx, dw, db = _BWD(grad_loss.contiguous(), x, weight, bias, target, lse, *ctx.opts, 0.0, cw)
        return (dx, dw, (db if bias is not None else None)) + rest


torch.library.register_autograd(
    "longtune::linear_cross_entropy_fwd", _Fn.backward, setup_context=_Fn.setup_context
)


@register_flop_formula(torch.ops.longtune.linear_cross_entropy_fwd)
def _flops_fwd(x, weight, *args, out_shape=None, **kwargs) -> int:
    return 2 * x[0] * x[1] * weight[0]


@register_flop_formula(torch.ops.longtune.linear_cross_entropy_bwd)
def _flops_bwd(grad, x, weight, *args, out_shape=None, **kwargs) -> int:
    return 6 * x[0] * x[1] * weight[0]  # logits recomputed, dx, dW


@register_flop_formula(torch.ops.longtune.linear_cross_entropy_fwd_bwd)
def _flops_fwd_bwd(x, weight, *args, out_shape=None, **kwargs) -> int:
    weight_grad = kwargs.get("weight_grad", args[7] if len(args) > 7 else True)
    return (6 if weight_grad else 4) * x[0] * x[1] * weight[0]  # logits, dx[, dW]: no recompute


class _GradInForward(torch.autograd.Function):
    """reduction "mean" / "sum" (CPU and CUDA): the per-row loss weights (1/n or 1) are known
    before the backward, so one pass of ``linear_cross_entropy_fwd_bwd`` returns the loss and the
    gradients (three GEMMs instead of forward + recomputing backward's four); backward scales them
    by the incoming scalar gradient. dx and dW are kept in float32 (float64 for float64 inputs:
    the op's accumulators, ``fp32_grads=True``) from forward to backward and rounded to the inputs'
    dtypes once, after the scaling (rounding before it would round float16 / bfloat16 gradients
    twice under loss scaling or ``loss * k``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, opts, n, class_weight):
        ct = _ldt(x)
        grad_rows = (target != opts[0]).to(ct) / n
        # a frozen head (LoRA, ...): no dW GEMM at all
        weight_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        with torch.no_grad():
            # the inputs in their own dtype (CUDA: float16 / bfloat16 GEMMs on the tensor cores),
            # the gradients in the compute dtype (fp32_grads)
            loss, lse, dx, dw, db, amax = _FWD_BWD(
                x, weight, bias, target, grad_rows, *opts, weight_grad, class_weight, True
            )
        ctx.save_for_backward(
            dx, dw if weight_grad else None, db if bias is not None and weight_grad else None
        )
        ctx.mark_non_differentiable(lse, amax)
        return loss.sum() / n, lse, amax

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_lse, _grad_amax):
        dx, dw, db = ctx.saved_tensors
        tx, tw, tb = ctx.dtypes
        if float(grad) != 1.0:  # scaled in float32, then rounded once
            g = grad.to(dx.dtype)
            dx, dw, db = (None if t is None else t * g for t in (dx, dw, db))
        return (
            dx.to(tx),
            None if dw is None else dw.to(tw),
            None if db is None else db.to(tb),
            None,
            None,
            None,
            None,
        )


class _Filtered(torch.autograd.Function):
    """The opt-in filtered backward (filter_eps > 0) as a plain autograd.Function."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, opts, filter_eps, class_weight):
        with torch.no_grad():
            loss, lse, amax = _FWD(x, weight, bias, target, *opts, class_weight)
        ctx.save_for_backward(x, weight, bias, target, lse, class_weight)
        ctx.opts, ctx.filter_eps = opts, filter_eps
        ctx.mark_non_differentiable(lse, amax)
        return loss, lse, amax

    @staticmethod
    def backward(ctx, grad, _grad_lse, _grad_amax):
        x, weight, bias, target, lse, cw = ctx.saved_tensors
        dx, dw, db = _BWD(
            grad.contiguous(), x, weight, bias, target, lse, *ctx.opts, ctx.filter_eps, cw
        )
        return dx, dw, (db if bias is not None else None), None, None, None, None


class LinearCrossEntropyOutput(NamedTuple):
    """What :func:`linear_cross_entropy` returns when an extra output is requested (fields not
    requested are None). All extras are detached (for logging) and come from the same pass."""

    loss: torch.Tensor
    z_loss: Optional[torch.Tensor] = None  # the z-loss part of ``loss``, reduced as the loss
    accuracy: Optional[torch.Tensor] = (
        None  # fraction of non-ignored rows whose argmax logit is the target
    )
    predictions: Optional[torch.Tensor] = None  # argmax logit per row (int64, target's shape)


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    rows: Optional[torch.Tensor] = None,
    filter_eps: float = 0.0,
    class_weight: Optional[torch.Tensor] = None,
    return_z_loss: bool = False,
    return_accuracy: bool = False,
    return_predictions: bool = False,
):
    """``F.cross_entropy(x @ weight.T + bias, target, ...)`` without materialising the logits.

    x (..., d), weight (V, d), bias (V,) or None, target (...) int64 (``ignore_index`` rows count
    nothing). ``reduction``: "mean" (over non-ignored targets; 0 when every target is ignored, with
    a warning outside torch.compile), "sum" or "none" (per row, 0 for ignored rows).
    ``label_smoothing`` as in
    F.cross_entropy; ``z_loss``: + z_loss * lse^2 per row (PaLM); ``softcap``: logits
    softcap * tanh(logits / softcap) (Gemma 2). ``rows``: compute only at these positions (an index
    tensor or a bool mask over the flattened tokens; the Long-VITA "logits-masked LM head": prompt
    and padding positions cost nothing) -- "none" then returns the selected rows only.
    ``filter_eps`` > 0: the backward skips vocabulary tiles whose gradient is below it (Cut
    Cross-Entropy's filter; approximate, off by default).

    ``class_weight`` (V,): F.cross_entropy's ``weight`` (a row's loss is weighted by its target's
    weight, the label-smoothing term by each class's weight; "mean" divides by the sum of the
    non-ignored targets' weights); no gradient flows to it. The z-loss term is not weighted and
    "mean" averages it over the non-ignored rows.

    Extras, computed in the same pass and detached: ``return_z_loss`` (the z-loss part of the loss,
    reduced like it), ``return_accuracy`` (fraction of non-ignored rows whose argmax logit equals
    the target; 0 when every row is ignored), ``return_predictions`` (the argmax logit per row, ties
    to the lowest index as torch.argmax). With any of them the result is a
    :class:`LinearCrossEntropyOutput` (loss, z_loss, accuracy, predictions); otherwise the loss."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(
            f"linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}"
        )
    if x.shape[:-1] != target.shape:
        raise ValueError(
            f"linear_cross_entropy: target shape {tuple(target.shape)} must equal x's leading "
            f"shape {tuple(x.shape[:-1])}"
        )
    x2 = x.reshape(-1, x.shape[-1])
    t2 = target.reshape(-1)
    if rows is not None:
        rows = rows.reshape(-1)
        if rows.dtype == torch.bool:
            if rows.numel() != t2.numel():
                raise ValueError(
                    f"linear_cross_entropy: a bool rows mask needs {t2.numel()} entries, got "
                    f"{rows.numel()}"
                )
            rows = rows.nonzero().squeeze(1)
        x2, t2 = x2.index_select(0, rows), t2.index_select(0, rows)
    opts = (
        int(ignore_index),
        float(label_smoothing),
        float(z_loss),
        float(softcap) if softcap else 0.0,
    )
    if filter_eps < 0:
        raise ValueError(f"linear_cross_entropy: filter_eps must be >= 0, got {filter_eps}")
    cw = class_weight
    if cw is not None and (cw.dim() != 1 or cw.shape[0] != weight.shape[0]):
        raise ValueError(
            f"linear_cross_entropy: class_weight must have shape (vocab,) = ({weight.shape[0]},), "
            f"got {tuple(cw.shape)}"
        )
    cw = None if cw is None else cw.detach()
    extras = return_z_loss or return_accuracy or return_predictions
    out_dtype = x.dtype
    out_shape = t2.shape if rows is not None else target.shape
    valid = t2 != ignore_index
    # with class weights "mean" divides by the targets' weight sum W and the z-loss by the count n:
    # the op runs with z_loss * W / n (the rows' z-loss terms then sum to z_loss sum lse^2 * W / n)
    wden = None if cw is None else (cw[torch.where(valid, t2, 0)] * valid).sum()
    zsplit = cw is not None and reduction == "mean" and z_loss > 0
    if zsplit and not torch.compiler.is_compiling():
        n_ = int(valid.sum())
        if n_ > 0:
            opts = opts[:2] + (float(z_loss) * float(wden) / n_,) + opts[3:]
        zsplit = False
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x2, weight, bias)
    )
    if (
        reduction != "none"
        and filter_eps == 0
        and needs_grad
        and x2.device.type in ("cpu", "cuda")
        and not torch.compiler.is_compiling()
    ):
        n = (int(valid.sum()) if cw is None else float(wden)) if reduction == "mean" else 1
        if int(valid.sum()) > 0 and n != 0:
            loss, lse, amax = _GradInForward.apply(x2, weight, bias, t2, opts, n, cw)
            return (
                _finish(
                    loss.to(out_dtype),
                    lse,
                    amax,
                    t2,
                    valid,
                    out_shape,
                    reduction,
                    float(z_loss),
                    return_z_loss,
                    return_accuracy,
                    return_predictions,
                )
                if extras
                else loss.to(out_dtype)
            )
    if zsplit:  # compiled: the z-loss rows come from a second call (below)
        opts = opts[:2] + (0.0,) + opts[3:]
    if filter_eps > 0:
        loss, lse, amax = _Filtered.apply(x2, weight, bias, t2, opts, float(filter_eps), cw)
    else:
        loss, lse, amax = _FWD(x2, weight, bias, t2, *opts, cw)
    fin = (
        (
            lambda l: _finish(
                l,
                lse,
                amax,
                t2,
                valid,
                out_shape,
                reduction,
                float(z_loss),
                return_z_loss,  # noqa: E731
                return_accuracy,
                return_predictions,
            )
        )
        if extras
        else (lambda l: l)
    )
    if reduction == "none":
        return fin(loss.view(out_shape).to(out_dtype))
    total = loss.sum()
    if reduction == "sum":
        return fin(total.to(out_dtype))
    # the count stays a tensor (a compiled graph cannot branch on it); every row ignored: the total
    # is 0 and so is the mean and its gradient (eager also warns)
    n = (t2 != ignore_index).sum()
    if not torch.compiler.is_compiling() and int(n) == 0:
        warnings.warn(
            "linear_cross_entropy: every target is ignore_index; the mean loss is 0", stacklevel=2
        )
    if cw is not None:
        # the weights of the targets (0 when every row is ignored: the total is 0 too)
        mean = total / torch.where(wden != 0, wden, torch.ones_like(wden)).to(total.dtype)
        if zsplit:  # class weights 0: the rows' z-loss alone
            zrows = _FWD(
                x2, weight, bias, t2, opts[0], 0.0, float(z_loss), opts[3], torch.zeros_like(cw)
            )[0]
            mean = mean + zrows.sum() / n.clamp_min(1).to(zrows.dtype)
        return fin(mean.to(out_dtype))
    return fin((total / n.clamp_min(1).to(total.dtype)).to(out_dtype))


def _finish(
    loss,
    lse,
    amax,
    t2,
    valid,
    out_shape,
    reduction,
    z_loss,
    return_z_loss,
    return_accuracy,
    return_predictions,
):
    """The detached extras of linear_cross_entropy from the op's lse and argmax rows."""
    zl = acc = pred = None
    if return_z_loss:
        zr = torch.where(valid, z_loss * lse.detach() * lse.detach(), torch.zeros_like(lse))
        n = valid.sum()
        zl = (
            zr.view(out_shape)
            if reduction == "none"
            else zr.sum()
            if reduction == "sum"
            else zr.sum() / n.clamp(min=1)
        ).to(loss.dtype)
    if return_accuracy:
        hits = ((amax == t2) & valid).sum()
        acc = hits.to(_ldt(lse)) / valid.sum().clamp(min=1)
    if return_predictions:
        pred = amax.view(out_shape)
    return LinearCrossEntropyOutput(loss, zl, acc, pred)
