"""S²FT on a Llama MLP block (d = 2048, 3% of the FFN channels trainable): training step time and
training memory vs full fine-tuning of the block and vs LoRA r=32 on its three projections, side by
side. Memory = bytes saved for backward + gradients + AdamW state (counted exactly through
autograd's saved-tensor hooks, so it works on CPU too). Issue targets: step >= 2.7x faster than
full fine-tuning, memory <= 1/3 of it, faster than LoRA r=32."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness as H  # noqa: E402
from longtune.nn import S2FTLinear  # noqa: E402


class MLP(nn.Module):
    def __init__(self, d, inter):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, inter, bias=False), nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def run(device: str, out_dir: str, quick: bool = False) -> H.Report:
    report = H.Report("s2ft")
    d, inter, tokens = (2048, 5632, 1024) if not quick else (512, 1408, 256)
    torch.manual_seed(0)
    base = MLP(d, inter).to(device)
    x = torch.randn(tokens, d, device=device)
    target = torch.randn(tokens, d, device=device)
    n_ch = max(1, round(0.03 * inter))
    variants = {}
    full = copy.deepcopy(base)
    variants["full fine-tuning"] = (full, list(full.parameters()))
    s2 = copy.deepcopy(base).requires_grad_(False)
    s2.up_proj = S2FTLinear(s2.up_proj, 0, n_ch, "out")
    s2.down_proj = S2FTLinear(s2.down_proj, 0, n_ch, "in")
    variants["S2FT 3% channels"] = (s2, [s2.up_proj.part, s2.down_proj.part])
    lo = copy.deepcopy(base).requires_grad_(False)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(lo, name, H.LoRALinear(getattr(lo, name), 32))
    variants["LoRA r=32"] = (lo, [p for p in lo.parameters() if p.requires_grad])
    case = f"Llama MLP d={d} inter={inter} tokens={tokens}"
    params = {"d": d, "inter": inter, "tokens": tokens, "channels": n_ch}
    t, mem = {}, {}
    for name, (model, ps) in H.progress(list(variants.items()), "s2ft"):
        opt = torch.optim.AdamW(ps, lr=1e-4)

        def step(model=model, opt=opt):
            loss = nn.functional.mse_loss(model(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t[name] = H.measure(report, case, name, step, device, params,
                            min_time_s=4.0 if device == "cpu" else 0.25).median_ms
        mem[name] = H.training_memory(model, x, lambda y: nn.functional.mse_loss(y, target), ps)
        report.results[-1].params = dict(params, training_memory_bytes=mem[name])
    H.add_ratio(report, case, "step speedup of S2FT vs full fine-tuning", t["full fine-tuning"] / t["S2FT 3% channels"], 2.7)
    H.add_ratio(report, case, "full FT memory / S2FT memory", mem["full fine-tuning"] / mem["S2FT 3% channels"], 3.0)
    H.add_ratio(report, case, "LoRA r=32 step time / S2FT step time", t["LoRA r=32"] / t["S2FT 3% channels"], 1.0)
    H.write(report, out_dir, device)
    return report


if __name__ == "__main__":
    H.cli(run)
