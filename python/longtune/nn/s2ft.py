"""``S2FTLinear`` (S²FT): a frozen linear layer of which one contiguous block of output rows
(``dim="out"``: v / up projections) or input columns (``dim="in"``: o / down projections) trains,
updated in place in the layer's own weight storage.

Partial backprop: ``dX = dY W`` as usual, but the weight gradient is computed for the block only:
``dW[rows] = dY[:, rows]^T X`` or ``dW[:, cols] = dY^T X[:, cols]`` - and for ``dim="in"`` only
``X[:, cols]`` is saved for backward, not X. Gradients accumulate across micro-batches (autograd's
``.grad +=``); the optimizer sees only the block (so weight decay touches only the block).

State dict: ``base.weight`` (the whole trained weight), ``base.bias``, ``part`` (a copy of the
trained block, so that safetensors and ``save_pretrained`` see no shared storage) and
``original_part`` (the block before training: ``adapter()`` / ``unfuse()`` still work after
loading). Loading writes ``part`` into the block of ``base.weight`` and keeps ``part`` a view of it.
"""

from __future__ import annotations

import torch
from torch import nn


class _S2FTFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, part, weight, bias, lo, hi, dim):
        ctx.dim, ctx.lo, ctx.hi = dim, lo, hi
        saved_x = x if dim == "out" else x[..., lo:hi].contiguous()
        ctx.save_for_backward(saved_x, weight)
        ctx.bias_grad = bias is not None and bias.requires_grad
        return nn.functional.linear(x, weight, bias)  # `part` lives inside `weight`'s storage

    @staticmethod
    def backward(ctx, gy):
        xs, weight = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        x2 = xs.reshape(-1, xs.shape[-1])
        gx = gy @ weight if ctx.needs_input_grad[0] else None
        gpart = None
        if ctx.needs_input_grad[1]:
            gpart = g2[:, ctx.lo : ctx.hi].T @ x2 if ctx.dim == "out" else g2.T @ x2
        gb = g2.sum(0) if ctx.bias_grad else None
        return gx, gpart, None, gb, None, None, None


class S2FTLinear(nn.Module):
    def __init__(self, base: nn.Linear, lo: int, hi: int, dim: str = "out"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"S2FTLinear: base must be an nn.Linear, got {type(base).__name__}")
        if dim not in ("out", "in"):
            raise ValueError(f"S2FTLinear: dim must be 'out' (rows) or 'in' (columns), got {dim!r}")
        size = base.out_features if dim == "out" else base.in_features
        if not (0 <= lo < hi <= size):
            raise ValueError(
                f"S2FTLinear: the trainable block [{lo}, {hi}) must be a non-empty range inside "
                f"[0, {size}) ({'out' if dim == 'out' else 'in'}_features)"
            )
        self.base, self.lo, self.hi, self.dim = base, lo, hi, dim
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        view = base.weight.data[lo:hi] if dim == "out" else base.weight.data[:, lo:hi]
        self.part = nn.Parameter(view)  # shares storage with base.weight: updates land in place
        self.register_buffer("original_part", view.detach().clone())
        self.register_state_dict_post_hook(_s2ft_state_dict_hook)
        self.register_load_state_dict_post_hook(_s2ft_load_post_hook)

    def _block(self) -> torch.Tensor:
        w = self.base.weight.data
        return w[self.lo : self.hi] if self.dim == "out" else w[:, self.lo : self.hi]

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @torch.no_grad()
    def adapter(self) -> torch.Tensor:
        """The learned update of the block (trained minus original), for serving as an adapter."""
        return self.part.detach() - self.original_part

    @torch.no_grad()
    def unfuse(self) -> torch.Tensor:
        """Restore the original block in the weight and return the update (an adapter)."""
        delta = self.adapter()
        self.part.copy_(self.original_part)
        return delta

    @torch.no_grad()
    def fuse(self, delta: torch.Tensor) -> None:
        """Apply an adapter (from ``unfuse`` / ``adapter``) to the block, in place."""
        if delta.shape != self.part.shape:
            raise ValueError(
                f"S2FTLinear.fuse: adapter shape {tuple(delta.shape)} != block "
                f"{tuple(self.part.shape)}"
            )
        self.part.copy_(self.original_part + delta.to(self.part))

    def forward(self, x):
        return _S2FTFn.apply(
            x, self.part, self.base.weight, self.base.bias, self.lo, self.hi, self.dim
        )

    def extra_repr(self):
        return (
            f"{self.base.in_features} -> {self.base.out_features}, trainable {self.dim} "
            f"[{self.lo}, {self.hi})"
        )


def _s2ft_state_dict_hook(module: S2FTLinear, state: dict, prefix: str, local_metadata) -> None:
    key = prefix + "part"
    if key in state:  # a copy: ``part`` is a view of base.weight, which the state dict holds too
        state[key] = state[key].detach().clone()


@torch.no_grad()
def _s2ft_load_post_hook(module: S2FTLinear, incompatible_keys) -> None:
    block = module._block()
    if module.part.device.type == "meta" or block.device.type == "meta":
        return
    if module.part.data_ptr() != block.data_ptr() or module.part.shape != block.shape:
        # loaded with assign=True (or the weight was replaced): re-attach the block to the weight
        block.copy_(module.part.detach())
        module.part.data = block


def _silu_grad(g: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(g)
    return s * (1 + g * (1 - s))


class _S2FTMLPFn(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) with FFN channels [0, n) trainable in up (rows) and down
    (columns), everything else frozen. Structured partial backprop across the whole block: the
    weight gradients need only channels [0, n) of dH, so when x needs no gradient (the block's input
    is frozen) the backward is three T x d x n products - the dense dH = dY W_down is never formed;
    when x needs one, dX takes the dense path (dH, then dG, dU through the frozen gate / up
    weights)."""

    @staticmethod
    def forward(ctx, x, up_part, down_part, w_gate, w_up, w_down, n):
        g = nn.functional.linear(x, w_gate)
        u = nn.functional.linear(x, w_up)
        ctx.n, ctx.x_grad = n, x.requires_grad
        if x.requires_grad:
            ctx.save_for_backward(x, g, u, w_gate, w_up, w_down)
            h = nn.functional.silu(g) * u
        else:  # only the first n channels are ever needed again; g becomes h in place
            a_n = nn.functional.silu(g[..., :n])
            ctx.save_for_backward(x, a_n, u[..., :n].contiguous(), w_down)
            h = nn.functional.silu(g, inplace=True).mul_(u)
        return nn.functional.linear(h, w_down)

    @staticmethod
    def backward(ctx, gy):
        n = ctx.n
        gy2 = gy.reshape(-1, gy.shape[-1])
        if ctx.x_grad:
            x, g, u, w_gate, w_up, w_down = ctx.saved_tensors
            a = nn.functional.silu(g)
            dh = gy @ w_down
            du = dh * a
            dg = dh * u * _silu_grad(g)
            gx = dg @ w_gate + du @ w_up
            a_n, u_n, du_n = a[..., :n], u[..., :n], du[..., :n]
        else:
            x, a_n, u_n, w_down = ctx.saved_tensors
            gx = None
            du_n = (gy @ w_down[:, :n]) * a_n
        x2 = x.reshape(-1, x.shape[-1])
        h_n = (a_n * u_n).reshape(-1, n)
        g_down = gy2.T @ h_n if ctx.needs_input_grad[2] else None
        g_up = du_n.reshape(-1, n).T @ x2 if ctx.needs_input_grad[1] else None
        return gx, g_up, g_down, None, None, None, None


class S2FTMLP(nn.Module):
    """A Llama-style gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, SiLU) whose ``up_proj``
    and ``down_proj`` are ``S2FTLinear`` with the same trainable channel block ``[0, n)`` (rows of
    up, columns of down - what ``select_and_permute`` builds) and a frozen ``gate_proj``, run as one
    fused autograd function with block-level partial backprop (see ``_S2FTMLPFn``). The trainable
    parameters stay ``mlp.up_proj.part`` / ``mlp.down_proj.part`` (optimizer state is unchanged)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        up, down, gate = (
            getattr(mlp, "up_proj", None),
            getattr(mlp, "down_proj", None),
            getattr(mlp, "gate_proj", None),
        )
        if not (
            isinstance(up, S2FTLinear)
            and isinstance(down, S2FTLinear)
            and isinstance(gate, nn.Linear)
        ):
            raise TypeError(
                "S2FTMLP: expected an MLP with gate_proj (nn.Linear) and up_proj / down_proj "
                "(S2FTLinear)"
            )
        if not (
            up.dim == "out"
            and down.dim == "in"
            and up.lo == 0
            and down.lo == 0
            and up.hi == down.hi
        ):
            raise ValueError(
                "S2FTMLP: up_proj must train rows [0, n) and down_proj columns [0, n) with the "
                f"same n, got up {up.dim} [{up.lo}, {up.hi}), down {down.dim} [{down.lo}, "
                f"{down.hi})"
            )
        if (
            gate.weight.requires_grad
            or any(m.base.bias is not None for m in (up, down))
            or gate.bias is not None
        ):
            raise ValueError("S2FTMLP: gate_proj must be frozen and the projections bias-free")
        act = getattr(mlp, "act_fn", None)
        hf_silu = type(act).__name__ == "SiLUActivation" and type(act).__module__.startswith(
            "transformers"
        )
        if not (isinstance(act, nn.SiLU) or act is nn.functional.silu or hf_silu):
            raise ValueError(
                f"S2FTMLP: only SiLU gated MLPs are fused, got activation {type(act).__name__}"
            )
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.__dict__["_mlp"] = mlp  # the module it replaces (not a submodule), for ``unload``

    def unload(self) -> nn.Module:
        """The plain MLP it replaced, with plain linear layers holding the trained weights."""
        mlp = self.__dict__["_mlp"]
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = (
            self.gate_proj,
            self.up_proj.base,
            self.down_proj.base,
        )
        return mlp

    def forward(self, x):
        up, down = self.up_proj, self.down_proj
        return _S2FTMLPFn.apply(
            x, up.part, down.part, self.gate_proj.weight, up.base.weight, down.base.weight, up.hi
        )
