"""Long-context fine-tuning with longtune, end to end on a CPU in a few minutes (no downloads).

1. Build a small Llama from a config in code (context 1024) and pre-train it briefly (sequence
   lengths 32 -> 1024) on a synthetic passkey-retrieval task: a single digit hidden somewhere in a
   stream of filler tokens must be repeated after the query marker at the end (chance: 10%).
2. Extend its context 4x (4096) with the LongLoRA recipe (``longtune.recipes.longlora``: rotary
   position interpolation, LoRA on the attention projections, trainable embeddings and norms,
   shifted sparse attention S^2-Attn in training through longtune's kernels).
3. Fine-tune on 4096-token sequences and report the passkey accuracy at 4096 tokens before and
   after (evaluation with full causal attention, LongLoRA's contract).

A progress bar shows each phase (tqdm when installed, a plain one-line counter otherwise). The
results and the loss curve go to --out (default bench-results/finetune_long_context/):
finetune_long_context_<tag>.json (accuracies, timing, the recipe's summary and `loss_curve`, one
{"phase", "step", "loss"} per training step) and, when matplotlib is importable, a PNG of the curve.

    python examples/finetune_long_context.py                 # S^2-Attn fine-tuning (default)
    python examples/finetune_long_context.py --attention full
    python examples/finetune_long_context.py --seco            # chunk-wise backward (SeCO), 4 chunks
    python examples/finetune_long_context.py --seco --spaco 2  # SpaCO: backward through 2 of 4 chunks
    python examples/finetune_long_context.py --device cuda
    python examples/finetune_long_context.py --out examples/results   # refresh the committed results
"""  # noqa: E501 -- the usage block is the --help text

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import longtune

DEFAULT_OUT = "bench-results/finetune_long_context"

PAD, BOS, QUERY = 0, 1, 2
DIGITS = list(range(3, 13))  # the passkey alphabet (10 symbols -> chance 10%)
FILLER0, VOCAB = 13, 64


class _PlainProgress:
    """A minimal stand-in for tqdm: one line per phase, rewritten in place (every step on a
    terminal, every tenth of the phase otherwise), with the latest postfix."""

    def __init__(self, iterable, desc: str):
        self.items, self.desc, self.post = list(iterable), desc, ""
        self.every = 1 if sys.stderr.isatty() else max(1, len(self.items) // 10)

    def set_postfix(self, **kw):
        self.post = ", ".join(f"{k}={v}" for k, v in kw.items())

    def __iter__(self):
        n = len(self.items)
        for i, item in enumerate(self.items):
            yield item
            if (i + 1) % self.every == 0 or i + 1 == n:
                end = "\n" if i + 1 == n else ("\r" if sys.stderr.isatty() else "\n")
                print(f"{self.desc}: {i + 1}/{n} {self.post}", end=end, file=sys.stderr, flush=True)


def progress(iterable, desc: str):
    """tqdm's bar when tqdm is installed, a plain counter otherwise."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(iterable, desc)
    return tqdm(iterable, desc=desc)


def make_batch(batch, seqlen, gen, device, near=None):
    """Filler tokens, one passkey digit at a random position (within the last `near` tokens if
    given), the query marker at seqlen - 2 and the digit as the last token (the only labelled
    position)."""
    x = torch.randint(FILLER0, VOCAB, (batch, seqlen), generator=gen)
    x[:, 0] = BOS
    key = torch.randint(0, len(DIGITS), (batch,), generator=gen)
    pos = torch.randint(
        1 if near is None else max(1, seqlen - 2 - near), seqlen - 2, (batch,), generator=gen
    )
    x[torch.arange(batch), pos] = torch.tensor(DIGITS)[key]
    x[:, -2] = QUERY
    x[:, -1] = torch.tensor(DIGITS)[key]
    labels = torch.full_like(x, -100)
    labels[:, -1] = x[:, -1]
    return x.to(device), labels.to(device)


@torch.no_grad()
def accuracy(model, seqlen, n, device, seed=1234, batch=4):
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    hits = 0
    for i in range(0, n, batch):
        x, _ = make_batch(min(batch, n - i), seqlen, gen, device)
        logits = model(input_ids=x[:, :-1]).logits[:, -1]
        pred = logits[:, DIGITS].argmax(-1)
        hits += int((torch.tensor(DIGITS, device=device)[pred] == x[:, -1]).sum())
    return hits / n


def curriculum(steps, context):
    """Sequence lengths doubling from 32 up to `context` (equal stages, the last one longer): the
    retrieval is learnt on short sequences first, where its gradient is not diluted over thousands
    of filler tokens."""
    lens = []
    n = 32
    while n < context:
        lens.append(n)
        n *= 2
    lens.append(context)
    per = max(1, steps // (len(lens) + 1))
    return [lens[min(i // per, len(lens) - 1)] for i in range(steps)]


def train(
    model, steps, batch, seqlen, lr, device, desc, seed, losses, near=None, chunk=None, budget=None
):
    """`seqlen`: an int or a per-step list of lengths."""
    lens = seqlen if isinstance(seqlen, list) else [seqlen] * steps
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in (bar := progress(range(steps), desc)):
        x, labels = make_batch(batch, lens[step], gen, device, near)
        opt.zero_grad(set_to_none=True)
        if chunk:  # chunk-wise backward: SeCO (exact) or SpaCO (budget chunks)
            loss = longtune.train.seco_backward(
                model, x, labels, chunk_size=chunk, budget=budget, generator=gen
            )
        else:
            loss = model(input_ids=x, labels=labels).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append((desc, loss.item()))
        bar.set_postfix(loss=f"{loss.item():.3f}")


def loss_curve(losses):
    """[(phase, loss), ...] -> [{"phase", "step" (within the phase), "loss"}, ...]."""
    curve, step = [], {}
    for phase, value in losses:
        step[phase] = step.get(phase, 0) + 1
        curve.append({"phase": phase, "step": step[phase], "loss": value})
    return curve


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--attention",
        choices=["s2", "full"],
        default="s2",
        help="fine-tuning attention at 4x context",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--context", type=int, default=1024, help="pre-training context (extended 4x)")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--eval-samples", type=int, default=40)
    ap.add_argument(
        "--seco", action="store_true", help="fine-tune with chunk-wise backward (SeCO, 4 chunks)"
    )
    ap.add_argument(
        "--spaco",
        type=int,
        default=None,
        metavar="K",
        help="with --seco: SpaCO, backward through K chunks",
    )
    ap.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help="output folder for the JSON and the PNG (default: %(default)s)",
    )
    a = ap.parse_args()
    if a.spaco is not None and not a.seco:
        raise SystemExit("--spaco K needs --seco")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dev = torch.device(a.device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=a.context,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(dev, dtype)
    longtune.patch(model, attention="causal")  # our flash kernel for pre-training too
    long_ctx = 4 * a.context
    losses, t0 = [], time.time()
    acc_untrained = accuracy(model, long_ctx, a.eval_samples, dev)
    train(
        model,
        a.pretrain_steps,
        8,
        curriculum(a.pretrain_steps, a.context),
        3e-3,
        dev,
        "pre-train @<=%d" % a.context,
        0,
        losses,
    )
    acc_short = accuracy(model, a.context, a.eval_samples, dev)
    acc_long_before = accuracy(model, long_ctx, a.eval_samples, dev)
    print(
        f"pre-trained: passkey accuracy {acc_short:.0%} at {a.context} tokens, "
        f"{acc_long_before:.0%} at {long_ctx} tokens (chance 10%)"
    )

    model, summary = longtune.recipes.longlora(
        model,
        target_context=long_ctx,
        lora_r=8,
        lora_alpha=16,
        patch_attention=(a.attention == "s2"),
    )
    print(
        f"LongLoRA recipe: rope factor {summary['rope_factor']:.0f}, trainable "
        f"{summary['trainable']:,} of {summary['total']:,} parameters {summary['by_kind']}"
    )
    acc_interp = accuracy(model, long_ctx, a.eval_samples, dev)
    # S^2-Attn trains on groups of N/4 tokens (the query sees its own group), so the fine-tuning
    # passkeys sit in the last eighth (seen by the shifted heads too); evaluation uses full
    # attention with the passkey anywhere (LongLoRA: train sparse and local, infer dense and
    # global).
    near = long_ctx // 8 - 2 if a.attention == "s2" else None
    chunk = long_ctx // 4 if a.seco else None
    if (
        a.seco and a.attention == "s2"
    ):  # chunks see the past KV: S^2 needs a fixed group size (not N/4 of a chunk)
        longtune.patch(model, attention="s2", group_size=long_ctx // 4)
    train(
        model,
        a.finetune_steps,
        2,
        long_ctx,
        1e-3,
        dev,
        f"fine-tune @{long_ctx} ({a.attention}"
        f"{', SpaCO K=%d' % a.spaco if a.spaco else ', SeCO' if a.seco else ''})",
        1,
        losses,
        near,
        chunk,
        a.spaco,
    )
    acc_after = accuracy(model, long_ctx, a.eval_samples, dev)
    elapsed = time.time() - t0
    print(
        f"passkey accuracy at {long_ctx} tokens: {acc_untrained:.0%} untrained, "
        f"{acc_long_before:.0%} after pre-training at {a.context}, {acc_interp:.0%} after position "
        f"interpolation, {acc_after:.0%} after LongLoRA fine-tuning ({a.attention}); chance 10%; "
        f"{elapsed:.0f} s total"
    )

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "attention": a.attention,
        "context": a.context,
        "long_context": long_ctx,
        "accuracy_untrained": acc_untrained,
        "accuracy_short": acc_short,
        "accuracy_long_before": acc_long_before,
        "accuracy_long_interpolated": acc_interp,
        "accuracy_long_after": acc_after,
        "seconds": elapsed,
        "summary": {k: v for k, v in summary.items() if k != "attention"},
        "loss_curve": loss_curve(losses),
    }
    tag = a.attention + ("_spaco%d" % a.spaco if a.spaco else "_seco" if a.seco else "")
    (out / f"finetune_long_context_{tag}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out}/finetune_long_context_{tag}.json")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ys = [v for _, v in losses]
        ax.plot(ys, lw=1)
        ax.axvline(a.pretrain_steps, color="gray", ls="--", lw=1)
        ax.text(a.pretrain_steps, max(ys) * 0.95, f" LongLoRA fine-tuning @{long_ctx}", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("passkey loss")
        ax.set_title(
            f"tiny Llama, passkey at {long_ctx} tokens: {acc_untrained:.0%} untrained -> "
            f"{acc_after:.0%}"
        )
        fig.tight_layout()
        fig.savefig(out / f"finetune_long_context_{tag}.png", dpi=120)
        print(f"wrote {out}/finetune_long_context_{tag}.png")
    except ImportError:
        print("matplotlib is not installed: no PNG of the loss curve (the JSON has it)")


if __name__ == "__main__":
    main()
