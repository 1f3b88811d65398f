"""Long-context fine-tuning with sequence parallelism: every sequence is split over the W processes
of a torchrun launch (rank r holds tokens [r N / W, (r + 1) N / W)), S^2-Attn exchanges the rows
its groups need between neighbouring ranks (``longtune.distributed``), and the gradients are
summed over the ranks.

A small Llama is built from a config in code (no downloads), extended 4x with the LongLoRA recipe
(``longtune.recipes.longlora``: rotary interpolation, LoRA, trainable embeddings and norms,
S^2-Attn), given the fused cross-entropy head, and fine-tuned on a synthetic counting task (each
token is the previous one plus one, modulo the vocabulary, from a random start: the loss falls
from ln(vocab) as the model learns it).

    # CPU, 4 processes (gloo):
    torchrun --nproc-per-node 4 examples/finetune_long_context_sp.py --steps 10
    # GPUs, one process per GPU (NCCL):
    torchrun --nproc-per-node 8 examples/finetune_long_context_sp.py --backend nccl \\
        --seq-len 65536 --hidden 1024 --layers 8 --steps 100

The sequence length must be a multiple of the number of processes, and the S^2 group size
(``--group-size-ratio`` x sequence length) even.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import longtune
import longtune.distributed as sp
from longtune.recipes import longlora


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len // 4,  # extended 4x by the recipe
        attention_dropout=0.0,
    )
    model = LlamaForCausalLM(cfg).to(device)
    model, summary = longlora(model, args.seq_len, lora_r=8, group_size_ratio=args.group_size_ratio)
    longtune.patch(model, lm_head="fused_ce")  # the loss without materialising the logits
    sp.patch_sequence_parallel(model)  # every rank of the default group holds a shard
    return model.train(), summary


def counting_batch(args, step, device):
    """(B, N) tokens: start + t modulo the vocabulary from a random start per row (the same batch
    on every rank: each takes its shard)."""
    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, args.vocab, (args.batch, 1), generator=gen)
    return ((start + torch.arange(args.seq_len)) % args.vocab).to(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--group-size-ratio", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model, summary = build_model(args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    g = int(args.group_size_ratio * args.seq_len)
    if rank == 0:
        print(
            f"{world} ranks x {args.seq_len // world} tokens (N={args.seq_len}, S^2 group {g}, "
            f"mode {sp.sp_mode(args.seq_len, world, args.heads, g)}); trainable "
            f"{summary['trainable']} of {summary['total']} parameters",
            flush=True,
        )
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids = counting_batch(args, step, device)
        batch = sp.shard_batch(ids, ids)  # labels shifted over the whole sequence, then split
        # the patch normalises by the global number of targets (num_items_in_batch)
        loss = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            shift_labels=batch.labels,
        ).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sp.sum_gradients(params)  # the whole sequence's gradient: the sum over the ranks
        opt.step()
        total = loss.detach().reshape(1).clone()
        dist.all_reduce(total)  # the ranks' parts of the mean token loss
        if rank == 0:
            print(
                f"step {step + 1:3d}/{args.steps}  loss {total.item():.4f}  "
                f"{(time.perf_counter() - t0) * 1e3:.0f} ms",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
