"""Where an S²FT training step's time goes, next to the bound: the S²FT step (``S2FTMLP``, frozen
block input, 3% channels), the block's three bare forward GEMMs, the S²FT forward alone, one AdamW
step over the full block and a full fine-tuning step, timed round-robin (9 rounds, medians and
paired ratios). S²FT cannot be cheaper than the three forward GEMMs, so full / 3 GEMMs bounds the
speedup over full fine-tuning. Prints only (diagnostic for benchmarks/s2ft.py).

Run: ``python -m benchmarks.s2ft_breakdown [tokens]`` (default 1024)."""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from benchmarks import harness as H  # noqa: E402
from benchmarks.s2ft import MLP, s2ft_block, train_step  # noqa: E402


def main(tokens: int) -> None:
    d, inter = 2048, 5632
    n = round(0.03 * inter)
    torch.manual_seed(0)
    base = MLP(d, inter)
    x, target = torch.randn(tokens, d), torch.randn(tokens, d)
    s2 = s2ft_block(base, n)
    s2_opt = torch.optim.AdamW([s2.up_proj.part, s2.down_proj.part], lr=1e-4)
    full = copy.deepcopy(base)
    full_opt = torch.optim.AdamW(full.parameters(), lr=1e-4)
    adam_only = copy.deepcopy(base)
    adam_opt = torch.optim.AdamW(adam_only.parameters(), lr=1e-4)
    for p in adam_only.parameters():
        p.grad = torch.randn_like(p)
    w = [
        base.gate_proj.weight.detach(),
        base.up_proj.weight.detach(),
        base.down_proj.weight.detach(),
    ]
    h = torch.randn(tokens, inter)

    def gemms():
        nn.functional.linear(x, w[0])
        nn.functional.linear(x, w[1])
        nn.functional.linear(h, w[2])

    def s2_forward():
        with torch.no_grad():
            s2(x)

    impls = [
        ("S2FT step", lambda: train_step(s2, s2_opt, x, target)),
        ("3 forward GEMMs", gemms),
        ("S2FT forward", s2_forward),
        ("AdamW over the block", adam_opt.step),
        ("full FT step", lambda: train_step(full, full_opt, x, target)),
    ]
    times = H.measure_interleaved(
        H.Report("s2ft_breakdown"), f"tokens={tokens}", impls, "cpu", {}, rounds=9
    )
    for name, t in times.items():
        print(f"{name:<22} {sorted(t)[len(t) // 2]:9.1f} ms")
    for num, den in (
        ("S2FT step", "3 forward GEMMs"),
        ("S2FT forward", "3 forward GEMMs"),
        ("full FT step", "3 forward GEMMs"),
        ("full FT step", "S2FT step"),
    ):
        print(f"{num} / {den}: {H.paired_ratio(times, num, den):.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1024)
