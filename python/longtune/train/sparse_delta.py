"""SpIEL training helpers: ``sparsify`` (swap a model's linear layers for SparseDeltaLinear),
``SparseAdamW`` (the fused sparse AdamW over the deltas, decoupled weight decay on deltas only) and
``SpIELScheduler`` (prune / regrow: SpIEL-AG with accumulated-gradient growth, or SpIEL-MA with
SM3 row / column accumulators as memory-lean growth scores). Quantized (8-/4-bit) base layers are
not supported."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..nn.sparse_delta import SparseDeltaLinear
from ..ops.sparse_delta import sparse_adamw_, sparse_delta_grad


def sparsify(
    model: nn.Module, *, density: float = 0.01, target_modules=None, seed: int | None = None
) -> nn.Module:
    """Replace every ``nn.Linear`` whose qualified name matches ``target_modules`` (a list of name
    suffixes, or a regex string; default: all linear layers) by a SparseDeltaLinear wrapping it, and
    freeze every other parameter. In place; returns the model.

    Saving: ``model.state_dict()`` (or a Trainer checkpoint) holds each layer's base weight without
    the deltas plus its ``indices`` / ``values``, and loads exactly into the same architecture
    sparsified again with the same ``target_modules`` (any seed: the indices are replaced);
    ``longtune.train.save_sparse_adapter`` saves only the deltas, for ``load_sparse_adapter`` onto
    the base model; ``longtune.train.merge_and_unload`` gives the plain model (W + Δ) for
    ``save_pretrained`` / ``from_pretrained``."""

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
            if (
                isinstance(child, nn.Linear)
                and not isinstance(child, SparseDeltaLinear)
                and wanted(full)
            ):
                setattr(
                    mod,
                    child_name,
                    SparseDeltaLinear(
                        child, density=density, seed=None if seed is None else seed + replaced
                    ),
                )
                replaced += 1
    if replaced == 0:
        raise ValueError(
            f"longtune.sparsify: no nn.Linear matched target_modules={target_modules!r}"
        )
    return model


class SparseAdamW(torch.optim.Optimizer):
    """AdamW for 1-D delta tensors (SparseDeltaLinear.values) through the fused kernel.

    Per-parameter state: ``exp_avg`` / ``exp_avg_sq`` (float32) and ``age`` (int32, the step count
    of each delta, so that regrown deltas get their own bias correction). ``load_state_dict`` keeps
    those dtypes (torch's default loader would cast them to the parameter's dtype); state saved
    after a prune / regrow loads into an optimizer over the re-loaded model like any other."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.register_load_state_dict_post_hook(_sparse_adamw_state_dtypes)

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
                sparse_adamw_(
                    p.data,
                    p.grad,
                    st["exp_avg"],
                    st["exp_avg_sq"],
                    st["age"],
                    lr=group["lr"],
                    betas=group["betas"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )
        return loss


def _sparse_adamw_state_dtypes(optimizer: SparseAdamW) -> None:
    for st in optimizer.state.values():
        for key, dt in (
            ("exp_avg", torch.float32),
            ("exp_avg_sq", torch.float32),
            ("age", torch.int32),
        ):
            if key in st and st[key].dtype != dt:
                st[key] = st[key].to(dt)


def _summed(t: torch.Tensor, group) -> torch.Tensor:
    """``t`` summed over the ranks of ``group`` (None: one process, ``t`` itself)."""
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, group=group)
    return t


def _growth_group(group):
    """The process group SpIELScheduler sums its gradient statistics over: ``group`` (a
    ProcessGroup or a 1-D DeviceMesh); ``False``: none (per-rank statistics); default: every
    process (``torch.distributed.group.WORLD``) when torch.distributed is initialised with more
    than one process -- data-parallel, sequence-parallel and dp x cp ranks then all score the
    gradient of the whole global batch -- else none (one process)."""
    if group is False:
        return None
    if group is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    from ..distributed.comm import resolve_group

    return resolve_group(group, "SpIELScheduler")


class _GrowthStats:
    """Growth scores of one layer over a window: at the first collected step the top ``n_cand``
    inactive entries by |dW| are found tile by tile (``tile_rows`` rows of dW at a time, running
    top-k: the dense dW is never held whole); later steps add |dW| at those candidates with the
    gather-only kernel."""

    def __init__(self, layer: SparseDeltaLinear, n_cand: int, tile_rows: int, group=None):
        self.layer, self.n_cand, self.tile_rows, self.group = layer, n_cand, tile_rows, group
        self.cand = None
        self.score = None

    @torch.no_grad()
    def __call__(self, gy, x):
        out, inp = self.layer.out_features, self.layer.in_features
        g = gy.reshape(-1, out).float()
        xx = x.reshape(-1, inp).float()
        self._observe(lambda r0, r1: g[:, r0:r1].T @ xx, lambda c: sparse_delta_grad(g, xx, c, inp))

    @torch.no_grad()
    def dense(self, dw):
        """The same statistics from the dense weight gradient (out, in), for a layer whose
        gradient is computed whole (the vocabulary head under the fused loss)."""
        dw = dw.detach().float()
        self._observe(lambda r0, r1: dw[r0:r1].clone(), lambda c: dw.reshape(-1)[c])

    def _observe(self, rows, at):
        """``rows(r0, r1)``: rows [r0, r1) of dW; ``at(cand)``: dW at the flat indices ``cand``."""
        out, inp = self.layer.out_features, self.layer.in_features
        if self.cand is None:
            dev = self.layer.values.device
            best_v = torch.empty(0, device=dev)
            best_i = torch.empty(0, dtype=torch.long, device=dev)
            active = self.layer.indices
            for r0 in range(0, out, self.tile_rows):
                r1 = min(out, r0 + self.tile_rows)
                blk = _summed(rows(r0, r1), self.group).abs().reshape(-1)
                lo, hi = r0 * inp, r1 * inp
                act = active[(active >= lo) & (active < hi)] - lo
                blk[act] = -1.0  # never grow an active entry
                v, i = blk.topk(min(self.n_cand, blk.numel()))
                best_v, best_i = torch.cat([best_v, v]), torch.cat([best_i, i + lo])
                if best_v.numel() > self.n_cand:
                    best_v, keep = best_v.topk(self.n_cand)
                    best_i = best_i[keep]
            ok = best_v >= 0
            self.cand, order = torch.sort(best_i[ok])
            self.score = best_v[ok][order].double()
        elif self.cand.numel():
            self.score += _summed(at(self.cand), self.group).abs().double()


class _SM3Stats:
    """SpIEL-MA: SM3 accumulators (one per row, one per column of the weight) of squared gradients,
    updated every step tile by tile (v = min(row[r], col[c]) + g^2; row = max_c v; col = max_r v);
    the growth score of an inactive entry is min(row[r], col[c]). O(out + in) memory, dense dW never
    held."""

    def __init__(self, layer: SparseDeltaLinear, tile_rows: int, group=None):
        self.layer, self.tile_rows, self.group = layer, tile_rows, group
        dev = layer.values.device
        self.row = torch.zeros(layer.out_features, device=dev)
        self.col = torch.zeros(layer.in_features, device=dev)

    @torch.no_grad()
    def __call__(self, gy, x):
        out, inp = self.layer.out_features, self.layer.in_features
        g = gy.reshape(-1, out).float()
        xx = x.reshape(-1, inp).float()
        self._observe(lambda r0, r1: g[:, r0:r1].T @ xx)

    @torch.no_grad()
    def dense(self, dw):
        """The same update from the dense weight gradient (out, in) (see ``_GrowthStats``)."""
        dw = dw.detach().float()
        self._observe(lambda r0, r1: dw[r0:r1].clone())

    def _observe(self, rows):
        out = self.layer.out_features
        new_row = torch.empty_like(self.row)
        new_col = torch.zeros_like(self.col)
        for r0 in range(0, out, self.tile_rows):
            r1 = min(out, r0 + self.tile_rows)
            v = (
                torch.minimum(self.row[r0:r1, None], self.col[None, :])
                + _summed(rows(r0, r1), self.group).square()
            )
            new_row[r0:r1] = v.amax(1)
            new_col = torch.maximum(new_col, v.amax(0))
        self.row, self.col = new_row, new_col

    @torch.no_grad()
    def candidates(self, n: int):
        out, inp = self.layer.out_features, self.layer.in_features
        best_v = torch.empty(0, device=self.row.device)
        best_i = torch.empty(0, dtype=torch.long, device=self.row.device)
        active = self.layer.indices
        for r0 in range(0, out, self.tile_rows):
            r1 = min(out, r0 + self.tile_rows)
            blk = torch.minimum(self.row[r0:r1, None], self.col[None, :]).reshape(-1).clone()
            lo = r0 * inp
            blk[active[(active >= lo) & (active < r1 * inp)] - lo] = -1.0
            v, i = blk.topk(min(n, blk.numel()))
            best_v, best_i = torch.cat([best_v, v]), torch.cat([best_i, i + lo])
            if best_v.numel() > n:
                best_v, keep = best_v.topk(n)
                best_i = best_i[keep]
        ok = best_v >= 0
        return best_i[ok], best_v[ok].double()


class SpIELScheduler:
    """SpIEL-AG prune / regrow. Call ``step()`` after every ``optimizer.step()``.

    Every ``update_every`` steps, the ``window`` backward passes before the update collect growth
    scores (accumulated |grad| of inactive candidates); the update then drops the ``p * k`` deltas
    of smallest magnitude and grows the same number of candidates with the largest scores (new
    deltas start at 0 with fresh optimizer state), so every layer keeps exactly k deltas. ``p =
    drop_fraction`` decays to 0 over ``total_steps`` (cosine or linear; constant without
    ``total_steps``). ``growth="ma"`` (SpIEL-MA) scores growth with SM3 accumulators updated at
    every step instead. ``state_dict()`` / ``load_state_dict()`` also carry the growth statistics of
    an open window and the SM3 accumulators: a run resumed from the model's, the optimizer's and
    this state continues exactly like an uninterrupted one.

    ``group``: the process group (a ProcessGroup or a 1-D DeviceMesh) over which the ranks'
    gradient statistics are summed, so that every rank scores the gradient of the whole batch and
    grows the same entries (each backward then all-reduces the candidates' gradients; the first
    backward of a window, and every backward with ``growth="ma"``, the dense weight gradient tile by
    tile). Default: every process (``torch.distributed.group.WORLD``) when torch.distributed is
    initialised with more than one process -- so data-parallel (DDP, FSDP), sequence-parallel and
    dp x cp ranks grow the entries one process would grow on the whole global batch, and the ranks'
    deltas stay identical -- else none. ``group=False`` keeps per-rank statistics (ranks that train
    independent models).
    """

    def __init__(
        self,
        model_or_layers,
        optimizer=None,
        *,
        update_every: int = 20,
        window: int = 5,
        drop_fraction: float = 0.2,
        decay: str = "cosine",
        total_steps: int | None = None,
        candidates_factor: float = 2.0,
        tile_rows: int = 256,
        growth: str = "ag",
        group=None,
    ):
        self.group = _growth_group(group)
        if isinstance(model_or_layers, nn.Module):
            self.layers = [m for m in model_or_layers.modules() if isinstance(m, SparseDeltaLinear)]
        else:
            self.layers = list(model_or_layers)
        if not self.layers:
            raise ValueError("SpIELScheduler: no SparseDeltaLinear layers to schedule")
        if not (1 <= window <= update_every):
            raise ValueError(
                f"SpIELScheduler: window must be in [1, update_every={update_every}], got {window}"
            )
        if not (0 <= drop_fraction <= 1):
            raise ValueError(
                f"SpIELScheduler: drop_fraction must be in [0, 1], got {drop_fraction}"
            )
        if decay not in ("cosine", "linear", "constant"):
            raise ValueError(
                f"SpIELScheduler: decay must be 'cosine', 'linear' or 'constant', got {decay!r}"
            )
        if growth not in ("ag", "ma"):
            raise ValueError(
                "SpIELScheduler: growth must be 'ag' (accumulated gradients) or 'ma' (SM3), got "
                f"{growth!r}"
            )
        self.growth = growth
        self._sm3 = (
            {id(l): _SM3Stats(l, tile_rows, self.group) for l in self.layers}
            if growth == "ma"
            else {}
        )
        self.optimizer = optimizer
        self.update_every, self.window, self.drop_fraction = update_every, window, drop_fraction
        self.decay, self.total_steps = decay, total_steps
        self.candidates_factor, self.tile_rows = candidates_factor, tile_rows
        self.step_count = 0
        self._arm_if_due()

    def current_drop_fraction(self) -> float:
        if self.total_steps is None or self.decay == "constant":
            return self.drop_fraction
        t = min(1.0, self.step_count / self.total_steps)
        f = 0.5 * (1 + math.cos(math.pi * t)) if self.decay == "cosine" else 1 - t
        return self.drop_fraction * f

    def _arm_if_due(self):
        if self.growth == "ma":  # SM3 accumulators see every step
            for layer in self.layers:
                layer._collect = self._sm3[id(layer)]
            return
        # the next backward pass belongs to the window when (step_count + 1) is in the last
        # `window` steps before an update
        phase = (self.step_count + 1) % self.update_every
        in_window = phase == 0 or phase > self.update_every - self.window
        for layer in self.layers:
            if in_window and layer._collect is None:
                n_drop = round(self.current_drop_fraction() * layer.values.numel())
                layer._collect = _GrowthStats(
                    layer, max(1, int(self.candidates_factor * n_drop)), self.tile_rows, self.group
                )
            elif not in_window:
                layer._collect = None

    @torch.no_grad()
    def step(self):
        self.step_count += 1
        if self.step_count % self.update_every == 0:
            for layer in self.layers:
                self._update(layer)
        self._arm_if_due()

    @torch.no_grad()
    def _update(self, layer: SparseDeltaLinear):
        k = layer.values.numel()
        n_drop = round(self.current_drop_fraction() * k)
        if self.growth == "ma":
            cand, score = self._sm3[id(layer)].candidates(max(1, n_drop))
        else:
            stats, layer._collect = layer._collect, None
            if stats is None or stats.cand is None:
                return
            cand, score = stats.cand, stats.score
        if n_drop == 0 or k == 0 or cand.numel() == 0:
            return
        n = min(n_drop, cand.numel())
        keep = torch.ones(k, dtype=torch.bool, device=layer.values.device)
        keep[layer.values.detach().abs().topk(n, largest=False).indices] = False
        grow = cand[score.topk(n).indices]
        layer.replace_deltas(keep, grow, self.optimizer)

    def state_dict(self) -> dict:
        """The step counter, the options, and the growth statistics collected so far: per layer (in
        ``self.layers`` order) the candidates / accumulated scores / candidate budget of an open
        SpIEL-AG window (None outside a window), or the SM3 row / column accumulators
        (``growth="ma"``).
        Tensors are copies; the dict is torch.save-able."""
        st = {
            "step_count": self.step_count,
            "update_every": self.update_every,
            "window": self.window,
            "drop_fraction": self.drop_fraction,
            "decay": self.decay,
            "total_steps": self.total_steps,
            "growth": self.growth,
            "candidates_factor": self.candidates_factor,
            "tile_rows": self.tile_rows,
            "num_layers": len(self.layers),
        }
        if self.growth == "ma":
            st["sm3"] = [
                (self._sm3[id(l)].row.clone(), self._sm3[id(l)].col.clone()) for l in self.layers
            ]
        else:
            windows = []
            for layer in self.layers:
                c = layer._collect
                if isinstance(c, _GrowthStats):
                    windows.append(
                        {
                            "n_cand": c.n_cand,
                            "cand": None if c.cand is None else c.cand.clone(),
                            "score": None if c.score is None else c.score.clone(),
                        }
                    )
                else:
                    windows.append(None)
            st["growth_stats"] = windows
        return st

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s state (also the growth statistics of an open window), so that
        training continues exactly as it would have without the interruption. Layers are matched
        by position (the model's module order)."""
        state = dict(state)
        sm3 = state.pop("sm3", None)
        windows = state.pop("growth_stats", None)
        n = state.pop("num_layers", None)
        if n is not None and n != len(self.layers):
            raise ValueError(
                f"SpIELScheduler.load_state_dict: the state is for {n} SparseDeltaLinear layers, "
                f"this scheduler has {len(self.layers)}"
            )
        for k, v in state.items():
            setattr(self, k, v)
        if self.growth == "ma":
            self._sm3 = {id(l): _SM3Stats(l, self.tile_rows, self.group) for l in self.layers}
            for l, (row, col) in zip(self.layers, sm3 or []):
                dev = l.values.device
                self._sm3[id(l)].row, self._sm3[id(l)].col = (
                    row.to(dev).clone(),
                    col.to(dev).clone(),
                )
        else:
            self._sm3 = {}
        for layer in self.layers:
            layer._collect = None
        if self.growth != "ma" and windows is not None:
            for layer, w in zip(self.layers, windows):
                if w is None:
                    continue
                stats = _GrowthStats(layer, w["n_cand"], self.tile_rows, self.group)
                dev = layer.values.device
                stats.cand = None if w["cand"] is None else w["cand"].to(dev).clone()
                stats.score = None if w["score"] is None else w["score"].to(dev).clone()
                layer._collect = stats
        self._arm_if_due()
