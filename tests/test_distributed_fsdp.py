"""FSDP2 with sequence parallelism on four CPU processes (gloo): a 2-D DeviceMesh (dp=2, cp=2),
parameters sharded over the flattened mesh with ``fully_shard``, a tiny Llama with peft LoRA
patched for S^2-Attn on the cp dimension; one step's LoRA gradients equal those of one process on
the full batch (float64, 1e-10 relative).

FSDP2 averages the gradients over the mesh it shards on (dp * cp ranks) while the full-batch
gradient is their sum (the loss is normalised by the global number of targets), so the loss is
multiplied by dp * cp."""

import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available in this build"
)

pytest.importorskip("transformers")
pytest.importorskip("peft")

import longtune  # noqa: E402
from longtune import distributed as sp  # noqa: E402

from ._gloo import init_gloo  # noqa: E402
from .test_distributed_hf import VOCAB, N, _rel, tiny_llama  # noqa: E402

TOL = 1e-10
DP, CP, B = 2, 2, 4  # B rows in the global batch, B / DP per data-parallel rank


def _lora_model():
    from peft import LoraConfig, get_peft_model

    m = tiny_llama()
    torch.manual_seed(1)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,  # B != 0, so that every LoRA factor has a gradient
        task_type="CAUSAL_LM",
    )
    m = get_peft_model(m, cfg)
    longtune.patch(m, attention="s2", lm_head="fused_ce")
    return m


def _data():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (B, N), generator=gen)
    return ids, ids.clone()


def _reference():
    m = _lora_model()
    ids, labels = _data()
    m(input_ids=ids, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def _fsdp_step(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (DP, CP), mesh_dim_names=("dp", "cp"))
    flat = mesh["dp", "cp"]._flatten("dp_cp")
    m = _lora_model()
    longtune.patch(m, sequence_parallel=mesh["cp"])  # re-applies the stored patch, on cp
    for layer in m.get_base_model().model.layers:
        fully_shard(layer, mesh=flat)
    fully_shard(m, mesh=flat)

    ids, labels = _data()
    dp_rank = mesh["dp"].get_local_rank()
    rows = slice(dp_rank * (B // DP), (dp_rank + 1) * (B // DP))
    batch = sp.shard_batch(ids[rows], labels[rows], group=mesh["cp"])
    n_targets = sp.global_token_count(batch.labels, group=flat)  # all targets, dp and cp
    out = m(input_ids=batch.input_ids, shift_labels=batch.labels, num_items_in_batch=n_targets)
    (out.loss * flat.size()).backward()  # FSDP2 averages over dp * cp ranks; the sum is wanted
    return {n: p.grad.full_tensor() for n, p in m.named_parameters() if p.requires_grad}


def _worker(rank, world, init_file):
    torch.set_num_threads(1)
    init_gloo(rank, world, init_file)
    try:
        got = _fsdp_step(rank)
        want = _reference()
        assert got.keys() == want.keys(), (sorted(got), sorted(want))
        assert any("lora_A" in n for n in want) and any("lora_B" in n for n in want)
        for name in want:
            err = _rel(got[name], want[name])
            assert err <= TOL, f"rank {rank}: gradient of {name} differs by {err:.3g}"
        dist.barrier()
    except Exception:
        raise AssertionError(traceback.format_exc()) from None
    finally:
        dist.destroy_process_group()


def test_fsdp2_dp_cp_lora_gradients(tmp_path):
    mp.spawn(_worker, args=(DP * CP, str(tmp_path / "init")), nprocs=DP * CP, join=True)
