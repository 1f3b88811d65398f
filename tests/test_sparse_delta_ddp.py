"""SpIEL's prune / regrow under DistributedDataParallel: two CPU processes (gloo) train a sparsified
float64 MLP on different halves of a batch; the scheduler (default group: every process) makes both
ranks grow the same entries -- the entries one process grows on the whole batch -- so the ranks'
deltas stay identical. With ``group=False`` (per-rank statistics) the ranks grow different ones."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available in this build"
)

import longtune  # noqa: E402

from ._gloo import init_gloo  # noqa: E402

D_IN, D_HID, ROWS = 24, 40, 16


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Linear(D_IN, D_HID), torch.nn.Tanh(), torch.nn.Linear(D_HID, D_IN)
    ).double()
    return longtune.sparsify(m, density=0.1, seed=0)


def _batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2 * ROWS, D_IN, generator=g, dtype=torch.float64)
    y = torch.randn(2 * ROWS, D_IN, generator=g, dtype=torch.float64)
    x[ROWS:, : D_IN // 2] *= 4  # the halves' gradients point at different entries
    y[ROWS:] *= -3
    return x, y


def _train(growth, rank=None, group=None, steps=3):
    """Indices after one SpIEL window (2 steps collect, the update, then one more step: DDP
    broadcasts rank 0's buffers, the indices among them, at each forward); rank None: one process
    on the whole batch (its loss: the mean of the two halves' losses, as DDP averages)."""
    model = _model()
    net = model if rank is None else torch.nn.parallel.DistributedDataParallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    kw = {} if group is None else {"group": group}
    sched = longtune.train.SpIELScheduler(
        model, opt, update_every=2, window=2, drop_fraction=0.5, growth=growth, **kw
    )
    x, y = _batch()
    for _ in range(steps):
        opt.zero_grad()
        if rank is None:  # the mean over both halves = the mean of the halves' means
            loss = torch.nn.functional.mse_loss(net(x), y)
        else:
            sl = slice(rank * ROWS, (rank + 1) * ROWS)
            loss = torch.nn.functional.mse_loss(net(x[sl]), y[sl])
        loss.backward()
        opt.step()
        sched.step()
    return {n: torch.sort(b)[0] for n, b in model.named_buffers() if n.endswith("indices")}


def _worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    init_gloo(rank, world, init_file, timeout_s=60)
    try:
        got = {g: _train(g, rank) for g in ("ag", "ma")}
        local = _train("ag", rank, group=False, steps=2)  # before any broadcast
        gathered = [None] * world
        dist.all_gather_object(gathered, {"got": got, "local": local})
        if rank == 0:
            torch.save(gathered, out_file)
    finally:
        dist.destroy_process_group()


def test_spiel_under_ddp_grows_the_whole_batch_entries(tmp_path):
    out = tmp_path / "out.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    r0, r1 = torch.load(out)
    for growth in ("ag", "ma"):
        want = _train(growth)
        for name, idx in want.items():
            assert torch.equal(r0["got"][growth][name], idx), (growth, name)
            assert torch.equal(r1["got"][growth][name], idx), (growth, name)
    # per-rank statistics (group=False): the ranks grow different entries (why the default sums;
    # DDP's next forward would then copy rank 0's indices over rank 1's own values' entries)
    assert any(not torch.equal(r0["local"][n], r1["local"][n]) for n in r0["local"])
