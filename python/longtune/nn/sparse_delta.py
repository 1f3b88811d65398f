"""``SparseDeltaLinear`` (SpIEL): a frozen ``nn.Linear`` plus k trainable deltas at sorted flat
indices of its weight.

The deltas live inside the frozen base weight's own storage (``W + scatter(values)``, patched in
O(k) whenever the values changed; only the k original entries are kept aside), so there is no second
copy of W and no per-call clone; backward computes ``dX = dY (W + Δ)`` with one dense product and
``d(values)`` with the gather-only kernel ``sparse_delta_grad`` (one length-T dot per index; the
dense dW is never formed).

State dict (exact at any point: before the first forward, after optimizer steps, after ``merge()``,
after prune / regrow changed the indices): ``base.weight`` is the base weight WITHOUT the deltas
(a copy with the k original entries put back; the live storage holds W + Δ), ``base.bias``,
``indices`` (int64, sorted) and ``values``; after ``merge()`` also ``folded`` (the deltas folded
into ``base.weight``, aligned with ``indices``, so that ``unmerge()`` still works after loading).
Loading accepts any number of deltas (the indices may differ from the module's own: they are
replaced, and ``values`` keeps its Parameter identity, so an optimizer built over the module stays
attached) and re-patches the base weight.
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
        gv = (
            sparse_delta_grad(gy.contiguous(), x.contiguous(), indices, x.shape[-1])
            if ctx.needs_input_grad[1]
            else None
        )
        gb = gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.bias_grad else None
        collect = getattr(ctx.owner, "_collect", None)
        if collect is not None:  # growth statistics for a prune / regrow schedule
            collect(gy.detach(), x.detach())
        return gx, gv, None, gb, None, None


class SparseDeltaLinear(nn.Module):
    def __init__(
        self,
        base: nn.Linear,
        *,
        density: float = 0.01,
        num_deltas: int | None = None,
        lora_rank: int | None = None,
        seed: int | None = None,
    ):
        """Budget: ``num_deltas``, else ``lora_rank`` (as many deltas as a LoRA of that rank has
        parameters: r * (in + out)), else ``density`` of the weight (default 1%)."""
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"SparseDeltaLinear: base must be an nn.Linear, got {type(base).__name__}"
            )
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
            raise ValueError(
                f"SparseDeltaLinear: num_deltas must be in [0, {numel}], got {num_deltas}"
            )
        self.base = base
        base.weight.requires_grad_(False)  # the base layer is frozen: only the deltas train
        if base.bias is not None:
            base.bias.requires_grad_(False)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        idx = torch.randperm(numel, generator=gen)[:num_deltas].sort().values
        self.register_buffer("indices", idx.to(base.weight.device))
        self.values = nn.Parameter(
            torch.zeros(num_deltas, dtype=base.weight.dtype, device=base.weight.device)
        )
        self._orig = None  # original base-weight entries at `indices` (k values)
        self._snapshot = None  # the values last written into the base weight
        self._collect = None  # set by longtune.train.sparse_delta.SpIELScheduler during its window
        self.register_buffer("_folded", None, persistent=False)
        self.register_state_dict_post_hook(_state_dict_hook)
        self.register_load_state_dict_post_hook(_load_post_hook)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The base weight itself, kept equal to W + scatter(values): the deltas live inside the
        frozen weight's storage and only the k original entries are remembered (O(k) memory - no
        second copy of W, no per-call clone). Patched in O(k) whenever the values changed (compared
        with a snapshot, so `.data` edits and fused optimizers are seen too)."""
        w = self.base.weight
        v = self.values.detach()
        if self._orig is None:
            self._orig = w.view(-1)[self.indices].clone()
            self._snapshot = None
        if torch.compiler.is_compiling():  # no snapshot comparison in a graph: patch the k entries
            w.view(-1)[self.indices] = self._orig + v
            self._snapshot = None  # eager calls re-patch once
            return w
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

    def _apply(self, fn, recurse=True):
        # .to() / .double() / .cuda(): convert the plain base weight; the next forward patches W + Δ
        # again (the k original entries are kept aside outside the module's parameters and buffers)
        with torch.no_grad():
            self._restore_base()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseDeltaFn.apply(
            x, self.values, self.merged_weight(), self.base.bias, self.indices, self
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the deltas into the base weight permanently (values become 0; ``unmerge`` undoes
        it)."""
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
    def delta(self) -> torch.Tensor:
        """The deltas at ``indices`` relative to the base weight the module was built on:
        ``values``, plus what ``merge()`` folded into the base."""
        v = self.values.detach()
        return v + self._folded if self._folded is not None else v.clone()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        with (
            torch.no_grad()
        ):  # the base storage goes back to W: the load may replace it, or only the deltas
            self._restore_base()
        ik, vk, fk = prefix + "indices", prefix + "values", prefix + "folded"
        idx, val, folded = state_dict.get(ik), state_dict.get(vk), state_dict.get(fk)
        rest = {k: v for k, v in state_dict.items() if k not in (ik, vk, fk)}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for key, t in ((ik, idx), (vk, val)):  # handled here, not by the default loader
            if t is not None and key in missing_keys:
                missing_keys.remove(key)
        if idx is None and val is None:
            return
        if idx is None or val is None:
            error_msgs.append(
                f"{prefix}indices and {prefix}values must be loaded together (got only "
                f"{ik if idx is not None else vk})"
            )
            return
        err = self._check_deltas(idx, val)
        if err is None and folded is not None and folded.shape != val.shape:
            err = (
                f"folded has shape {tuple(folded.shape)}, expected {tuple(val.shape)} "
                "(one per index)"
            )
        if err is not None:
            error_msgs.append(f"While loading {prefix or 'SparseDeltaLinear'}: {err}")
            return
        with torch.no_grad():
            dev, dt = self.values.device, self.values.dtype
            val = val.detach().to(device=dev, dtype=dt)
            if local_metadata.get("assign_to_params_buffers", False):
                self.values = nn.Parameter(val, requires_grad=self.values.requires_grad)
            elif val.shape == self.values.shape:
                self.values.copy_(val)
            else:  # another number of deltas: same Parameter object, new data
                self.values.data = val.clone()
            self.indices = idx.detach().to(device=self.indices.device, dtype=torch.long).clone()
            self._folded = (
                None if folded is None else folded.detach().to(device=dev, dtype=dt).clone()
            )

    def _check_deltas(self, idx: torch.Tensor, val: torch.Tensor):
        """None, or what is wrong with a set of deltas for this layer."""
        numel = self.base.weight.numel()
        if idx.dim() != 1 or val.dim() != 1 or idx.numel() != val.numel():
            return (
                f"indices and values must be 1-D of equal size, got shapes {tuple(idx.shape)} and "
                f"{tuple(val.shape)}"
            )
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            return f"indices must be integers, got {idx.dtype}"
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            return "indices must be strictly increasing"
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            return (
                f"indices out of range for a {self.out_features} x {self.in_features} weight "
                f"(flat indices must be in [0, {numel}))"
            )
        return None

    @torch.no_grad()
    def replace_deltas(self, keep: torch.Tensor, grow: torch.Tensor, optimizer=None) -> None:
        """Prune / regrow in place: keep the deltas where ``keep`` (bool [k]) is true, add zero
        deltas at the flat indices ``grow`` (must be inactive, unique). The number of deltas stays
        whatever keep.sum() + grow.numel() is. Optimizer state (any per-element tensor state of
        ``values``, e.g.
        SparseAdamW's exp_avg / exp_avg_sq / age, or torch.optim.AdamW's) follows the kept deltas;
        grown deltas start from zero state."""
        if keep.dtype != torch.bool or keep.shape != self.values.shape:
            raise ValueError(
                "SparseDeltaLinear.replace_deltas: keep must be a bool mask over the deltas"
            )
        if self._folded is not None:
            raise RuntimeError(
                "SparseDeltaLinear.replace_deltas: the deltas are merged into the base weight; "
                "call unmerge() before changing the indices"
            )
        grow = grow.to(self.indices.device, torch.long)
        if grow.numel():
            if int(grow.min()) < 0 or int(grow.max()) >= self.base.weight.numel():
                raise ValueError("SparseDeltaLinear.replace_deltas: grow indices out of range")
            if torch.unique(grow).numel() != grow.numel() or torch.isin(grow, self.indices).any():
                raise ValueError(
                    "SparseDeltaLinear.replace_deltas: grow indices must be unique and inactive"
                )
        self._restore_base()
        new_idx = torch.cat([self.indices[keep], grow])
        order = torch.argsort(new_idx)
        n_keep = int(keep.sum())

        def remap(t, fill=0):
            z = torch.full(
                (grow.numel(),) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=t.device
            )
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
                optimizer.state[new_values] = {
                    k: (remap(v) if torch.is_tensor(v) and v.shape[:1] == old.shape else v)
                    for k, v in st.items()
                }
        self.values = new_values
        assert self.values.numel() == n_keep + grow.numel()

    def delta_state_dict(self) -> dict:
        """Only what the fine-tuning changed: {"indices", "values"} (values relative to the base
        weight the module was built on, i.e. including anything ``merge()`` folded in)."""
        return {"indices": self.indices.detach().cpu(), "values": self.delta().cpu()}

    @torch.no_grad()
    def load_delta_state_dict(self, state: dict) -> None:
        """Replace the deltas by {"indices", "values"} (as from ``delta_state_dict``) over the
        current base weight. ``values`` becomes a new Parameter."""
        idx, val = state["indices"].to(self.indices.device), state["values"]
        err = self._check_deltas(idx, val)
        if err is not None:
            raise ValueError(f"SparseDeltaLinear.load_delta_state_dict: {err}")
        if val.dtype != self.base.weight.dtype:
            raise TypeError(
                f"SparseDeltaLinear.load_delta_state_dict: values are {val.dtype} but the base "
                f"weight is {self.base.weight.dtype}; convert one of them explicitly"
            )
        if self._folded is not None:
            raise RuntimeError(
                "SparseDeltaLinear.load_delta_state_dict: the deltas are merged into the base "
                "weight; call unmerge() first"
            )
        self._restore_base()
        self.indices = idx.long()
        self.values = nn.Parameter(val.to(self.base.weight.device).clone())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"deltas={self.values.numel()}"
        )


@torch.no_grad()
def _state_dict_hook(module: SparseDeltaLinear, state: dict, prefix: str, local_metadata) -> None:
    """``base.weight`` without the deltas (the live storage holds W + Δ); ``folded`` after
    merge()."""
    key = prefix + "base.weight"
    if key in state and module._orig is not None:
        w = state[key].detach().clone()
        w.view(-1)[module.indices] = module._orig
        state[key] = w
    if module._folded is not None:
        state[prefix + "folded"] = module._folded.detach().clone()


@torch.no_grad()
def _load_post_hook(module: SparseDeltaLinear, incompatible_keys) -> None:
    """After the base weight and the deltas are loaded: the k original entries are read from the
    freshly loaded base weight and W + Δ is patched in."""
    module._orig, module._snapshot = None, None
    if module.base.weight.device.type != "meta" and module.values.device.type != "meta":
        module.merged_weight()


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
