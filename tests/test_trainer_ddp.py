"""LongtuneTrainer under data parallelism: two CPU processes (gloo, set up by transformers /
accelerate from the usual torchrun environment variables) train a tiny Llama with S^2-Attn, the
fused loss and SeCO chunk-wise training. The trained weights must equal those of the ordinary
``Trainer`` (full backprop) on the same two processes (float64), with gradient accumulation and
each rank reading its own shard of the data."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available in this build"
)

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    from transformers import Trainer

    import longtune
    from longtune.config import AttentionConfig, ChunkwiseConfig, FusedCrossEntropyConfig
    from longtune.integrations.trainer import LongtuneTrainer

    from .test_trainer import CHUNK, Rows, _args, _params, _tiny

    def run(trainer_cls, model, name):
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        t = trainer_cls(
            model=model,
            args=_args(os.path.join(out_dir, name), max_steps=2),
            train_dataset=Rows(),
            optimizers=(opt, None),
        )
        assert t.args.world_size == WORLD and dist.get_world_size() == WORLD
        t.train()
        return _params(model)

    chunked = longtune.apply(
        _tiny(),
        AttentionConfig(kind="s2"),
        FusedCrossEntropyConfig(),
        ChunkwiseConfig(chunk_size=CHUNK),
    )
    plain = longtune.apply(_tiny(), AttentionConfig(kind="s2"), FusedCrossEntropyConfig())
    before = _params(chunked)
    got = run(LongtuneTrainer, chunked, "seco")
    want = run(Trainer, plain, "plain")
    if rank == 0:
        torch.save(
            {"before": before, "seco": got, "plain": want},
            os.path.join(out_dir, "params.pt"),
        )
    dist.barrier()
    dist.destroy_process_group()


def test_seco_trainer_under_ddp_equals_the_ordinary_trainer(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = torch.load(tmp_path / "params.pt", weights_only=True)
    moved = [n for n in res["seco"] if not torch.equal(res["seco"][n], res["before"][n])]
    assert len(moved) == len(res["seco"])  # every parameter trained
    for n in res["seco"]:
        torch.testing.assert_close(
            res["seco"][n], res["plain"][n], rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}"
        )
