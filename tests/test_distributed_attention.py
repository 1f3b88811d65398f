"""Sequence-parallel S^2-Attn (longtune.distributed) on CPU processes (gloo): every rank's output
and q / k / v gradients equal its rows of the single-process ``longtune.sparse_attention`` in
float64 (halo mode in both S^2 modes, Ulysses mode, GQA / MQA, batch 2, lengths that are not a
multiple of W * G; full causal attention in ring and Ulysses mode); the sharding helpers; the bytes
halo mode sends; bad input.

Each world size is one spawn that runs all its cases in one process group; a failing check raises
in the worker and fails the spawn with its message."""

import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available in this build"
)

import longtune  # noqa: E402
from longtune import distributed as sp  # noqa: E402

from ._gloo import init_gloo  # noqa: E402

TOL = 1e-12

# (B, N, H_q, H_kv, D, G, s2_mode, mode, expected mode): world 2
CASES_2 = [
    (2, 64, 4, 4, 8, 16, "leakfree", "halo", "halo"),
    (2, 64, 4, 4, 8, 16, "longlora_roll", "halo", "halo"),
    (1, 64, 4, 2, 8, 16, "leakfree", "auto", "halo"),  # GQA
    (1, 64, 4, 2, 8, 16, "longlora_roll", "auto", "halo"),
    (1, 64, 4, 1, 8, 32, "longlora_roll", "auto", "halo"),  # MQA, G = L
    (2, 48, 4, 2, 8, 16, "leakfree", "auto", "halo"),  # N = 48 not a multiple of W * G = 32
    (1, 40, 6, 3, 8, 16, "leakfree", "auto", "halo"),  # L % G != 0: unshifted heads need a halo
    (1, 40, 6, 3, 8, 16, "longlora_roll", "auto", "ulysses"),  # roll and N % G != 0
    (2, 64, 4, 4, 8, 16, "leakfree", "ulysses", "ulysses"),
    (1, 64, 4, 2, 8, 16, "longlora_roll", "ulysses", "ulysses"),
    (1, 32, 4, 2, 8, 64, "leakfree", "auto", "ulysses"),  # G > L
    (1, 32, 2, 1, 8, 64, "longlora_roll", "auto", "ulysses"),
    (1, 32, 2, 4, 8, 16, "leakfree", "auto", "halo"),  # H_kv > H_q (rSQA)
    # full causal attention (no S^2)
    (2, 32, 4, 2, 8, None, "leakfree", "ring", "ring"),
    (1, 32, 3, 1, 8, None, "leakfree", "auto", "ring"),  # H = 3: no head split
    (1, 32, 4, 4, 8, None, "leakfree", "auto", "ulysses"),
]
# world 4
CASES_4 = [
    (2, 64, 4, 4, 8, 16, "leakfree", "halo", "halo"),  # G = L = N / 4
    (1, 64, 4, 4, 8, 16, "longlora_roll", "halo", "halo"),
    (1, 64, 8, 2, 8, 16, "longlora_roll", "auto", "halo"),
    (1, 48, 4, 2, 8, 8, "leakfree", "auto", "halo"),  # L = 12, G = 8: halos for both halves
    (2, 64, 4, 4, 8, 16, "leakfree", "ulysses", "ulysses"),
    (1, 64, 8, 2, 8, 16, "longlora_roll", "ulysses", "ulysses"),  # GQA, H_kv < W: kv repeated
    (1, 32, 4, 1, 8, 32, "leakfree", "auto", "ulysses"),  # G > L, MQA
    (1, 32, 4, 2, 8, 32, "longlora_roll", "auto", "ulysses"),
    (2, 64, 4, 2, 8, None, "leakfree", "ring", "ring"),
    (1, 32, 2, 2, 8, None, "leakfree", "auto", "ring"),  # H < W
    (1, 32, 8, 2, 8, None, "leakfree", "ulysses", "ulysses"),
]


def _rel(a, b):
    scale = b.abs().max().clamp_min(1e-300)
    return float((a - b).abs().max() / scale)


def _check_case(rank, world, case, group=None):
    b, n, h_q, h_kv, d, g, s2_mode, mode, expect = case
    assert sp.sp_mode(n, world, max(h_q, h_kv), g, s2_mode, mode) == expect, case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))  # same on every rank
    q = torch.randn(b, n, h_q, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, n, h_kv, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, n, h_kv, d, generator=gen, dtype=torch.float64, requires_grad=True)
    go = torch.randn(b, n, max(h_q, h_kv), d, generator=gen, dtype=torch.float64)
    ref = longtune.sparse_attention(q, k, v, s2_group_size=g, s2_mode=s2_mode)
    ref.backward(go)
    n_loc = n // world
    rows = slice(rank * n_loc, (rank + 1) * n_loc)
    ql, kl, vl = (t.detach()[:, rows].clone().requires_grad_() for t in (q, k, v))
    out = sp.s2_attention_sp(
        ql, kl, vl, s2_group_size=g, s2_mode=s2_mode, mode=mode, timeout=60, group=group
    )
    out.backward(go[:, rows])
    for name, got, want in (
        ("out", out.detach(), ref.detach()[:, rows]),
        ("dq", ql.grad, q.grad[:, rows]),
        ("dk", kl.grad, k.grad[:, rows]),
        ("dv", vl.grad, v.grad[:, rows]),
    ):
        err = _rel(got, want)
        assert err <= TOL, f"rank {rank}, {case}: {name} differs by {err:.3g} (relative)"


def _expect_error(fn, exc, *words):
    try:
        fn()
    except exc as e:
        msg = str(e)
        assert all(w in msg for w in words), f"error {msg!r} lacks {words}"
        return
    raise AssertionError(f"no {exc.__name__} raised (expected one naming {words})")


def _check_bad_input(rank, world):
    x = torch.zeros(1, 8, 4, 8, dtype=torch.float64)

    def call(q=x, k=x, v=x, **kw):
        kw = {"s2_group_size": 4, **kw}
        return sp.s2_attention_sp(q, k, v, **kw)

    _expect_error(lambda: call(s2_group_size=5), ValueError, "s2_group_size", "even")
    _expect_error(lambda: call(s2_mode="roll"), ValueError, "s2_mode", "longlora_roll")
    _expect_error(lambda: call(mode="zigzag"), ValueError, "mode", "ulysses", "ring")
    _expect_error(lambda: call(mode="ring"), ValueError, "ring", "s2_group_size=None")
    _expect_error(lambda: call(s2_group_size=None, mode="halo"), ValueError, "halo", "S^2")
    _expect_error(lambda: call(q=x[0]), ValueError, "q", "4-D")
    _expect_error(lambda: call(v=x[:, :4]), ValueError, "k and v", "same shape")
    _expect_error(lambda: call(k=x[:, :4], v=x[:, :4]), ValueError, "local length")
    _expect_error(lambda: call(k=x[:, :, :3], v=x[:, :, :3]), ValueError, "H_q=4", "H_kv=3")
    # halo mode impossible (a shard of 2 tokens, groups of 8), ulysses impossible (3 heads)
    y = torch.zeros(1, 2, 3, 8, dtype=torch.float64)
    _expect_error(
        lambda: call(y, y, y, s2_group_size=8, mode="halo"), ValueError, "halo", "rows", "L=2"
    )
    _expect_error(
        lambda: call(y, y, y, s2_group_size=8, mode="ulysses"), ValueError, "heads", "3", "world"
    )
    _expect_error(lambda: call(y, y, y, s2_group_size=8), ValueError, "no mode applies")
    _expect_error(
        lambda: sp.sp_mode(40, world, 4, 16, "longlora_roll", "halo"),  # 40 % 16 != 0
        ValueError,
        "longlora_roll",
        "multiple",
    )
    _expect_error(lambda: call(timeout=0), ValueError, "timeout")
    _expect_error(lambda: sp.shard_sequence(torch.zeros(2, 7), 1), ValueError, "7", "multiple")
    _expect_error(lambda: sp.shard_sequence(torch.zeros(2, 8), 2), ValueError, "dim=2")
    ids = torch.zeros(2, 8, dtype=torch.long)
    _expect_error(lambda: sp.shard_batch(ids, ids[:, :4]), ValueError, "labels", "(2, 8)")
    _expect_error(lambda: sp.shard_batch(ids[:, :7]), ValueError, "input_ids", "7", "multiple")


def _check_sharding(rank, world):
    n = 4 * world
    ids = torch.arange(2 * n).view(2, n) + 1000
    labels = ids.clone()
    labels[1, 3] = -100
    batch = sp.shard_batch(ids, labels, attention_mask=torch.ones_like(ids), group=None)
    n_loc = n // world
    lo, hi = rank * n_loc, (rank + 1) * n_loc
    assert torch.equal(batch.input_ids, ids[:, lo:hi])
    assert torch.equal(batch.position_ids, torch.arange(lo, hi).expand(2, n_loc))
    assert torch.equal(batch.attention_mask, torch.ones(2, n_loc, dtype=torch.long))
    full = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    assert torch.equal(batch.labels, full[:, lo:hi])
    # the last token of a shard keeps its target: the next shard's first token
    if rank < world - 1:
        assert torch.equal(batch.labels[:, -1], ids[:, hi])
    else:
        assert (batch.labels[:, -1] == -100).all()
    assert torch.equal(sp.shard_sequence(ids, 1), ids[:, lo:hi])
    assert torch.equal(sp.shard_sequence(ids.t(), 0), ids.t()[lo:hi])
    total = sp.global_token_count(batch.labels)
    assert total == int((full != -100).sum()) == 2 * (n - 1) - 1, total


def _check_bytes(rank, world):
    """W = 4, G = N / 4: halo mode sends >= 10x fewer bytes than an all-gather of K and V."""
    b, n, h, d, g = 1, 256, 8, 16, 64
    x = torch.randn(b, n // world, h, d, dtype=torch.float64)
    allgather = 2 * (world - 1) * x.numel() * x.element_size()  # K and V to every other rank
    for s2_mode in ("leakfree", "longlora_roll"):
        with sp.count_comm() as stats:
            out = sp.s2_attention_sp(x, x, x, s2_group_size=g, s2_mode=s2_mode, mode="halo")
        assert out.shape == (b, n // world, h, d)
        halo = stats.total("halo")
        assert halo > 0 or (s2_mode == "leakfree" and rank == world - 1)
        assert halo * 10 <= allgather, (rank, s2_mode, halo, allgather)
        # exactly the shifted heads' G / 2 rows of K and V (rank W - 1 sends nothing in leakfree)
        rows = 0 if (s2_mode == "leakfree" and rank == world - 1) else g // 2
        assert halo == 2 * rows * (h // 2) * d * x.element_size(), (rank, s2_mode, halo)
        assert set(stats.bytes_sent) == {"halo"}


def _check_timeout(rank, world):
    """A rank whose neighbour never joins the exchange gets an error naming it and the exchange
    (the last check: the failed exchange leaves the process group unusable)."""
    if rank == 0:
        x = torch.zeros(1, 8, 4, 8, dtype=torch.float64)
        _expect_error(
            lambda: sp.s2_attention_sp(
                x, x, x, s2_group_size=8, s2_mode="longlora_roll", mode="halo", timeout=0.5
            ),
            sp.CommTimeoutError,
            "rank 0",
            "halo",
        )


def _worker(rank, world, init_file, cases, timeout_check):
    torch.set_num_threads(1)
    init_gloo(rank, world, init_file)
    try:
        for case in cases:
            _check_case(rank, world, case)
        _check_bad_input(rank, world)
        _check_sharding(rank, world)
        if world == 4:
            _check_bytes(rank, world)
            # two sequence-parallel groups of two ranks: peers are named by their global ranks
            pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            for case in (CASES_2[1], CASES_2[2], CASES_2[9]):
                _check_case(rank % 2, 2, case, group=pairs[rank // 2])
        else:
            # a 1-D DeviceMesh as the group
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("sp",))
            for case in (CASES_2[1], CASES_2[9]):
                _check_case(rank, world, case, group=mesh)
            # a group of one rank: the single-process op itself
            singles = [dist.new_group([r]) for r in range(world)]
            for case in (CASES_2[1], CASES_2[13]):
                _check_case(0, 1, case, group=singles[rank])
            ids = torch.arange(4 * world).view(2, -1)
            assert torch.equal(sp.shard_sequence(ids, 1, mesh), sp.shard_sequence(ids, 1))
            _expect_error(lambda: sp.shard_sequence(ids, 1, group=3), TypeError, "group")
        dist.barrier()
        if timeout_check:
            _check_timeout(rank, world)
    except Exception:
        raise AssertionError(traceback.format_exc()) from None
    finally:
        if not timeout_check:
            dist.destroy_process_group()


@pytest.mark.parametrize(
    "world, cases, timeout_check", [(2, CASES_2, True), (4, CASES_4, False)], ids=["W2", "W4"]
)
def test_sequence_parallel_s2_attention(tmp_path, world, cases, timeout_check):
    mp.spawn(
        _worker,
        args=(world, str(tmp_path / "init"), cases, timeout_check),
        nprocs=world,
        join=True,
    )
