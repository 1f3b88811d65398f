"""``SparseDeltaLinear`` (SpIEL): a frozen ``nn.Linear`` plus k trainable deltas at sorted flat
indices of its weight.

Forward uses a merged weight buffer ``W + scatter(values)`` that is built once and then patched in
O(k) whenever the values changed (no per-call clone of W); backward computes ``dX = dY (W + Δ)`` with
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
    def forward(ctx, x, values, merged, bias, indices):
        ctx.save_for_backward(x, merged, indices)
        ctx.bias_grad = bias is not None and bias.requires_grad
        return nn.functional.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, gy):
        x, merged, indices = ctx.saved_tensors
        gx = gy @ merged if ctx.needs_input_grad[0] else None
        gv = sparse_delta_grad(gy.contiguous(), x.contiguous(), indices, x.shape[-1]) if ctx.needs_input_grad[1] \
            else None
        gb = gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.bias_grad else None
        return gx, gv, None, gb, None


class SparseDeltaLinear(nn.Module):
    def __init__(self, base: nn.Linear, *, density: float = 0.01, num_deltas: int | None = None,
                 seed: int | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SparseDeltaLinear: base must be an nn.Linear, got {type(base).__name__}")
        numel = base.weight.numel()
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
        self._merged = None
        self._key = None
        self._snapshot = None
        self.register_buffer("_folded", None, persistent=False)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scatter(values): built once, then patched in O(k) whenever the values changed (compared
        with a snapshot, so edits that bypass autograd's version counter - `.data`, fused optimizers -
        are seen too). Rebuilt when the base weight or the indices change."""
        w = self.base.weight
        key = (w._version, w.data_ptr(), self.indices._version, self.indices.data_ptr(), self.indices.numel())
        v = self.values.detach()
        if self._merged is None or self._key != key:
            self._merged = w.detach().clone()
            self._merged.view(-1).index_add_(0, self.indices, v)
            self._snapshot = v.clone()
        elif not torch.equal(self._snapshot, v):
            self._merged.view(-1)[self.indices] = w.view(-1)[self.indices] + v
            self._snapshot = v.clone()
        self._key = key
        return self._merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseDeltaFn.apply(x, self.values, self.merged_weight(), self.base.bias, self.indices)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the deltas into the base weight (values become 0; ``unmerge`` undoes it)."""
        v = self.values.detach().clone()
        self.base.weight.view(-1).index_add_(0, self.indices, v)
        self._folded = v if self._folded is None else self._folded + v
        self.values.zero_()

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._folded is None:
            raise RuntimeError("SparseDeltaLinear.unmerge: nothing merged")
        self.base.weight.view(-1).index_add_(0, self.indices, -self._folded)
        self.values.add_(self._folded)
        self._folded = None

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
        self.indices = idx
        self.values = nn.Parameter(val.to(self.base.weight.dtype).to(self.base.weight.device))
        self._merged = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, deltas={self.values.numel()}"
