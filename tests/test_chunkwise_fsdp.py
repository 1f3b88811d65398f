"""SeCO / SpaCO under FSDP2 (``torch.distributed.fsdp.fully_shard`` on every decoder layer and on
the root): two CPU processes (gloo) each run seco_backward on their own sequence through the sharded
model. The sharded gradients, gathered, must equal the average of the two ranks' full-backprop
gradients (SeCO) or of their single-process SpaCO estimates (float64), and one chunk-wise step must
reduce-scatter as many times as one ordinary backward, not once per chunk. A caller that turned the
gradient sync off itself (accumulation over batches) keeps it off."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available in this build"
)

from longtune.train import seco_backward  # noqa: E402

from .test_chunkwise import batch, full_grads, full_loss, tiny_llama  # noqa: E402

N, CHUNK, BUDGET, SEED = 48, 16, 2, 7  # three chunks; SpaCO draws two


def _count_reduce_scatters(state):
    """Counts the reduce-scatter collectives issued through ``torch.distributed`` (FSDP2 calls
    one of these per parameter group and backward); a nested call counts once."""
    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        orig = getattr(dist, name, None)
        if orig is None:
            continue

        def counted(*args, _orig=orig, **kwargs):
            state["depth"] += 1
            try:
                if state["depth"] == 1:
                    state["calls"] += 1
                return _orig(*args, **kwargs)
            finally:
                state["depth"] -= 1

        setattr(dist, name, counted)


def _gathered(model):
    return {n: p.grad.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        model = tiny_llama()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)  # resharded after forward: the KV cache is activations
        fully_shard(model, mesh=mesh)
        state = {"calls": 0, "depth": 0}
        _count_reduce_scatters(state)
        ids, labels = batch(n=N, seed=10 + rank)
        res = {}

        def step(name, fn):
            model.zero_grad(set_to_none=True)
            state["calls"] = 0
            fn()
            res[name] = {"calls": state["calls"], "grads": _gathered(model)}

        # an ordinary backward through FSDP2: how many reduce-scatters a synchronised step makes
        step("full", lambda: full_loss(model, ids, labels).backward())
        step("seco", lambda: seco_backward(model, ids, labels, chunk_size=CHUNK))
        step(
            "spaco",
            lambda: seco_backward(
                model,
                ids,
                labels,
                chunk_size=CHUNK,
                budget=BUDGET,
                cap=None,
                generator=torch.Generator().manual_seed(SEED),
            ),
        )

        def accumulate():
            # the caller's own accumulation: no sync in the first batch, sync in the second
            model.set_requires_gradient_sync(False)
            seco_backward(model, ids, labels, chunk_size=CHUNK)
            res["unsynced_calls"] = state["calls"]
            model.set_requires_gradient_sync(True)
            seco_backward(model, ids, labels, chunk_size=CHUNK)

        step("accumulated", accumulate)
        if rank == 0:
            torch.save(res, out_file)
    finally:
        dist.destroy_process_group()


def _averaged(world, grads_of):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        ref = None
        for rank in range(world):
            ids, labels = batch(n=N, seed=10 + rank)
            g = grads_of(tiny_llama(), ids, labels)
            ref = g if ref is None else {n: ref[n] + g[n] for n in ref}
    finally:
        torch.set_num_threads(threads)  # the rest of the suite keeps its thread count
    return {n: r / world for n, r in ref.items()}


def _spaco_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(SEED)
    seco_backward(model, ids, labels, chunk_size=CHUNK, budget=BUDGET, cap=None, generator=gen)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_close(got, ref, what, scale=1.0):
    assert set(got) == set(ref), (sorted(set(ref) - set(got)), sorted(set(got) - set(ref)))
    for n, r in ref.items():
        r = r * scale
        err = (got[n] - r).abs().max().item() / max(r.abs().max().item(), 1e-300)
        assert err <= 1e-10, f"{what}, {n}: relative error {err:.2e} vs the ranks' average"


def test_seco_and_spaco_under_fsdp2(tmp_path):
    world = 2
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(out)), nprocs=world, join=True)
    res = torch.load(out)
    per_step = res["full"]["calls"]
    assert per_step >= 1, "the ordinary FSDP2 backward issued no counted reduce-scatter"
    for name in ("seco", "spaco", "accumulated"):
        assert res[name]["calls"] == per_step, (
            f"{name}: FSDP2 reduce-scattered {res[name]['calls']} times for one chunk-wise step; "
            f"one ordinary backward does {per_step} times"
        )
    assert res["unsynced_calls"] == 0, "seco_backward reduce-scattered with the sync turned off"

    ref = _averaged(world, lambda m, i, lab: full_grads(m, i, lab)[1])
    _assert_close(res["full"]["grads"], ref, "ordinary FSDP2 backward")  # the reference itself
    _assert_close(res["seco"]["grads"], ref, "SeCO")
    _assert_close(res["accumulated"]["grads"], ref, "two accumulated SeCO steps", scale=2.0)
    _assert_close(res["spaco"]["grads"], _averaged(world, _spaco_grads), "SpaCO")
