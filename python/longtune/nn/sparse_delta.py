"""``SparseDeltaLinear`` (SpIEL): a frozen ``nn.Linear`` plus k trainable deltas at sorted flat
indices of its weight.

The deltas live inside the frozen base weight's own storage (``W + scatter(values)``, patched in O(k)
whenever the values changed; only the k original entries are kept aside), so there is no second
copy of W and no per-call clone; backward computes ``dX = dY (W + Δ)`` with
one dense product and ``d(values)`` with the gather-only kernel ``sparse_delta_grad`` (one
length-T dot per index; the dense dW is never formed). Not yet here (see the issue): prune /
regrow schedules, the fused sparse AdamW, S²FT.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.sparse_delta import sparse_delta_grad


class _SparseDeltaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, merged, bias, indices, owner=None):
        ctx.save_for_backward(x, merged, indices)
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.owner = owner
        return nn.functional.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, gy):
        x, merged, indices = ctx.saved_tensors
        gx = gy @ merged if ctx.needs_input_grad[0] else None
        gv = sparse_delta_grad(gy.contiguous(), x.contiguous(), indices, x.shape[-1]) if ctx.needs_input_grad[1] \
            else None
        gb = gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.bias_grad else None
        collect = getattr(ctx.owner, "_collect", None)
        if collect is not None:  # growth statistics for a prune / regrow schedule
            collect(gy.detach(), x.detach())
        return gx, gv, None, gb, None, None


class SparseDeltaLinear(nn.Module):
    def __init__(self, base: nn.Linear, *, density: float = 0.01, num_deltas: int | None = None,
                 lora_rank: int | None = None, seed: int | None = None):
        """Budget: ``num_deltas``, else ``lora_rank`` (as many deltas as a LoRA of that rank has
        parameters: r * (in + out)), else ``density`` of the weight (default 1%)."""
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SparseDeltaLinear: base must be an nn.Linear, got {type(base).__name__}")
        numel = base.weight.numel()
        if num_deltas is None and lora_rank is not None:
            if lora_rank < 0:
                raise ValueError(f"SparseDeltaLinear: lora_rank must be >= 0, got {lora_rank}")
            num_deltas = min(numel, lora_rank * (base.in_features + base.out_features))
        if num_deltas is None:
            if not (0 < density <= 1):
                raise ValueError(f"SparseDeltaLinear: density must be in (0, 1], got {density}")
            num_deltas = max(1, round(density * numel))
        if not (0 <= num_deltas <= numel):
            raise ValueError(f"SparseDeltaLinear: num_deltas must be in [0, {numel}], got {num_deltas}")
        self.base = base
        base.weight.requires_grad_(False)  # the base layer is frozen: only the deltas train
        if base.bias is not None:
            base.bias.requires_grad_(False)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        idx = torch.randperm(numel, generator=gen)[:num_deltas].sort().values
        self.register_buffer("indices", idx.to(base.weight.device))
        self.values = nn.Parameter(torch.zeros(num_deltas, dtype=base.weight.dtype, device=base.weight.device))
        self._orig = None      # original base-weight entries at `indices` (k values)
        self._snapshot = None  # the values last written into the base weight
        self._collect = None  # set by longtune.train.sparse.SpIELScheduler during its window
        self.register_buffer("_folded", None, persistent=False)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The base weight itself, kept equal to W + scatter(values): the deltas live inside the frozen
        weight's storage and only the k original entries are remembered (O(k) memory - no second
        copy of W, no per-call clone). Patched in O(k) whenever the values changed (compared with a
        snapshot, so `.data` edits and fused optimizers are seen too)."""
        w = self.base.weight
        v = self.values.detach()
        if self._orig is None:
            self._orig = w.view(-1)[self.indices].clone()
            self._snapshot = None
        if self._snapshot is None or not torch.equal(self._snapshot, v):
            w.view(-1)[self.indices] = self._orig + v
            self._snapshot = v.clone()
        return w

    @torch.no_grad()
    def _restore_base(self) -> None:
        """Put the original entries back into the base weight (before the indices change)."""
        if self._orig is not None:
            self.base.weight.view(-1)[self.indices] = self._orig
        self._orig, self._snapshot = None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseDeltaFn.apply(x, self.values, self.merged_weight(), self.base.bias, self.indices, self)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the deltas into the base weight permanently (values become 0; ``unmerge`` undoes it)."""
        self.merged_weight()
        v = self.values.detach().clone()
        self._orig += v
        self._folded = v if self._folded is None else self._folded + v
        self.values.zero_()
        self._snapshot = self.values.detach().clone()

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._folded is None:
            raise RuntimeError("SparseDeltaLinear.unmerge: nothing merged")
        self.merged_weight()
        self._orig -= self._folded
        self.values.add_(self._folded)
        self._folded = None
        self.merged_weight()

    def base_weight(self) -> torch.Tensor:
        """A copy of the base weight without the deltas."""
        w = self.merged_weight().detach().clone()
        w.view(-1)[self.indices] = self._orig
        return w

    @torch.no_grad()
    def replace_deltas(self, keep: torch.Tensor, grow: torch.Tensor, optimizer=None) -> None:
        """Prune / regrow in place: keep the deltas where ``keep`` (bool [k]) is true, add zero deltas at
        the flat indices ``grow`` (must be inactive, unique). The number of deltas stays whatever
        keep.sum() + grow.numel() is. Optimizer state (any per-element tensor state of ``values``, e.g.
        SparseAdamW's exp_avg / exp_avg_sq / age, or torch.optim.AdamW's) follows the kept deltas;
        grown deltas start from zero state."""
        if keep.dtype != torch.bool or keep.shape != self.values.shape:
            raise ValueError("SparseDeltaLinear.replace_deltas: keep must be a bool mask over the deltas")
        grow = grow.to(self.indices.device, torch.long)
        if grow.numel():
            if int(grow.min()) < 0 or int(grow.max()) >= self.base.weight.numel():
                raise ValueError("SparseDeltaLinear.replace_deltas: grow indices out of range")
            if torch.unique(grow).numel() != grow.numel() or torch.isin(grow, self.indices).any():
                raise ValueError("SparseDeltaLinear.replace_deltas: grow indices must be unique and inactive")
        self._restore_base()
        new_idx = torch.cat([self.indices[keep], grow])
        order = torch.argsort(new_idx)
        n_keep = int(keep.sum())

        def remap(t, fill=0):
            z = torch.full((grow.numel(),) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            return torch.cat([t[keep], z])[order]

        old = self.values
        self.indices = new_idx[order]
        new_values = nn.Parameter(remap(old.detach()), requires_grad=old.requires_grad)
        if optimizer is not None:
            for group in optimizer.param_groups:
                for i, p in enumerate(group["params"]):
                    if p is old:
                        group["params"][i] = new_values
            st = optimizer.state.pop(old, None)
            if st:
                optimizer.state[new_values] = {k: (remap(v) if torch.is_tensor(v) and v.shape[:1] == old.shape
                                                   else v) for k, v in st.items()}
        self.values = new_values
        assert self.values.numel() == n_keep + grow.numel()

    def delta_state_dict(self) -> dict:
        """Only what the fine-tuning changed: {"indices", "values"}."""
        return {"indices": self.indices.detach().cpu(), "values": self.values.detach().cpu()}

    @torch.no_grad()
    def load_delta_state_dict(self, state: dict) -> None:
        idx, val = state["indices"].to(self.indices.device), state["values"]
        if idx.dim() != 1 or idx.numel() != val.numel():
            raise ValueError("SparseDeltaLinear.load_delta_state_dict: indices and values must be 1-D of equal size")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError("SparseDeltaLinear.load_delta_state_dict: indices must be strictly increasing")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.base.weight.numel()):
            raise ValueError("SparseDeltaLinear.load_delta_state_dict: indices out of range")
        if val.dtype != self.base.weight.dtype:
            raise TypeError(f"SparseDeltaLinear.load_delta_state_dict: values are {val.dtype} but the base weight is "
                            f"{self.base.weight.dtype}; convert one of them explicitly")
        self._restore_base()
        self.indices = idx
        self.values = nn.Parameter(val.to(self.base.weight.device))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, deltas={self.values.numel()}"


@torch.no_grad()
def compose_deltas(*states: dict) -> dict:
    """Composable sparse fine-tuning: the sum of several delta sets for the same layer
    ({"indices", "values"} each, as from ``delta_state_dict``) as one delta set over the union of
    their indices (shared indices add up)."""
    if not states:
        raise ValueError("compose_deltas: nothing to compose")
    idx = torch.cat([s["indices"].long() for s in states])
    val = torch.cat([s["values"].to(states[0]["values"].dtype) for s in states])
    uniq, inv = torch.unique(idx, sorted=True, return_inverse=True)
    out = torch.zeros(uniq.numel(), dtype=val.dtype)
    out.index_add_(0, inv, val)
    return {"indices": uniq, "values": out}
