"""SpIEL training helpers: ``sparsify`` (swap a model's linear layers for SparseDeltaLinear) and
``SparseAdamW`` (the fused sparse AdamW over the deltas, decoupled weight decay on deltas only).
Not yet here: the prune / regrow schedule (SpIEL-AG / SpIEL-MA)."""
from __future__ import annotations

import re

import torch
from torch import nn

from ..nn.sparse_delta import SparseDeltaLinear
from ..ops.sparse_delta import sparse_adamw_


def sparsify(model: nn.Module, *, density: float = 0.01, target_modules=None, seed: int | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` whose qualified name matches ``target_modules`` (a list of name
    suffixes, or a regex string; default: all linear layers) by a SparseDeltaLinear wrapping it, and
    freeze every other parameter. In place; returns the model."""
    def wanted(name):
        if target_modules is None:
            return True
        if isinstance(target_modules, str):
            return re.fullmatch(target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in target_modules)

    for p in model.parameters():
        p.requires_grad_(False)
    replaced = 0
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not isinstance(child, SparseDeltaLinear) and wanted(full):
                setattr(mod, child_name, SparseDeltaLinear(child, density=density,
                                                           seed=None if seed is None else seed + replaced))
                replaced += 1
    if replaced == 0:
        raise ValueError(f"longtune.sparsify: no nn.Linear matched target_modules={target_modules!r}")
    return model


class SparseAdamW(torch.optim.Optimizer):
    """AdamW for 1-D delta tensors (SparseDeltaLinear.values) through the fused kernel."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    st["age"] = torch.zeros_like(p, dtype=torch.int32)
                sparse_adamw_(p.data, p.grad, st["exp_avg"], st["exp_avg_sq"], st["age"], lr=group["lr"],
                              betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])
        return loss
