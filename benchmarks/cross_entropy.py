"""Fused linear cross-entropy (``longtune.linear_cross_entropy(x, weight, target)``) vs the naive
eager path ``F.cross_entropy(x @ weight.T, target)``, side by side: one training step = forward +
backward of x (T, d) and weight (V, d) (their ``.grad`` buffers pre-allocated, so the gradients
themselves are not charged to either implementation).

Time: the implementations round-robin in one process (``harness.measure_interleaved``), the ratio
the median of the per-round ratios with its 95% interval (``harness.add_speed_ratio``).
Peak memory: ``harness.peak_memory`` over one training step, after the timed (warm) calls: the peak
of bytes allocated above the level at the step's start (CPU: the allocator's events through the
profiler; GPU: ``torch.cuda.max_memory_allocated``), exact and the same on every call.
GPU peers: the naive path, the naive path through ``torch.compile`` (Inductor fuses the loss's
elementwise work but keeps the (T, V) logits), Liger's ``LigerFusedLinearCrossEntropyLoss`` and
Apple's Cut-Cross-Entropy ``cut_cross_entropy.linear_cross_entropy`` (each skipped with a message
when it cannot be imported or compiled).

Targets. CPU (fp32, T=4096, d=1024, V=32000): naive peak / fused peak >= 8, fused time <= 1.2x
naive (reported as naive time / fused time >= 1/1.2). GPU (bf16, T=8192, d=4096, V=128000): peak
<= 1/8 of naive (naive peak / fused peak >= 8), time <= 1.0x Liger (Liger time / fused time >= 1),
peak <= Cut-Cross-Entropy's (CCE peak / fused peak >= 1).

Run: ``python -m benchmarks.cross_entropy [--device cpu|cuda] [--out DIR] [--quick]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
import longtune  # noqa: E402
from benchmarks import harness as H  # noqa: E402

FUSED = "longtune fused linear CE"
NAIVE = "naive F.cross_entropy(x @ W.T)"
LIGER = "Liger FusedLinearCrossEntropy"
COMPILED = "torch.compile(naive)"
CCE = "Cut-Cross-Entropy"


def plot(report, path, device_name):
    """Two panels: median step time and peak memory per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = report.results
    labels = [f"{r.case}\n{r.impl}" for r in rs]
    colours = [plt.cm.tab10(i % 10) for i in range(len(rs))]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 0.5 * len(rs) + 2))
    y = list(range(len(rs)))[::-1]
    a1.barh(y, [r.median_ms for r in rs], color=colours)
    a1.set_yticks(y)
    a1.set_yticklabels(labels, fontsize=7)
    a1.set_xlabel("median step time, ms (fwd + bwd)")
    mem = [r.params.get("peak_memory_bytes", 0) / 2**20 for r in rs]
    a2.barh(y, mem, color=colours)
    a2.set_yticks(y)
    a2.set_yticklabels([])
    a2.set_xlabel("peak memory of the step, MiB")
    for yi, r, m in zip(y, rs, mem):
        a1.text(r.median_ms, yi, f" {r.median_ms:.4g}", va="center", fontsize=7)
        a2.text(m, yi, f" {m:.4g}", va="center", fontsize=7)
    fig.suptitle(f"linear cross-entropy - {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        print(
            f"\n[cross_entropy] {LIGER}: skipped (liger_kernel not importable: {e})",
            file=sys.stderr,
        )
        return None
    return LigerFusedLinearCrossEntropyLoss()


def _cce_loss():
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError as e:
        print(
            f"\n[cross_entropy] {CCE}: skipped (cut_cross_entropy not importable: {e})",
            file=sys.stderr,
        )
        return None
    return cce


def _compiled_naive():
    try:
        return torch.compile(lambda x, w, tgt: F.cross_entropy(x @ w.T, tgt))
    except Exception as e:  # noqa: BLE001 -- no compiler backend on this machine
        print(f"\n[cross_entropy] {COMPILED}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def run(device: str, out_dir: str, quick: bool = False) -> H.Report:
    report = H.Report("cross_entropy", quick=quick)
    cuda = device == "cuda"
    if cuda:
        t, d, v, dtype = (
            (8192, 4096, 128000, torch.bfloat16)
            if not quick
            else (2048, 1024, 32000, torch.bfloat16)
        )
    else:
        # --quick: T >> the fused op's row block (2^23 / V rows), as at the targeted shape
        t, d, v, dtype = (
            (4096, 1024, 32000, torch.float32) if not quick else (2048, 128, 8000, torch.float32)
        )
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(t, d, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device=device, generator=g) / d**0.5).to(dtype).requires_grad_()
    tgt = torch.randint(0, v, (t,), device=device, generator=g)
    x.grad, w.grad = torch.zeros_like(x), torch.zeros_like(w)

    impls = {
        FUSED: lambda: longtune.linear_cross_entropy(x, w, tgt),
        NAIVE: lambda: F.cross_entropy(x @ w.T, tgt),
    }
    if cuda:
        compiled = _compiled_naive()
        if compiled is not None:
            impls[COMPILED] = lambda: compiled(x, w, tgt)
        liger = _liger_loss()
        if liger is not None:
            impls[LIGER] = lambda: liger(
                w, x, tgt
            )  # Liger's signature: (lin_weight, _input, target)
        cce = _cce_loss()
        if cce is not None:
            # CCE's signature: (embeddings, classifier, targets)
            impls[CCE] = lambda: cce(x, w, tgt)

    case = f"T={t} d={d} V={v} {str(dtype).removeprefix('torch.')}"
    params = {"T": t, "d": d, "V": v, "dtype": str(dtype)}
    # fwd: 2TdV (logits); bwd: 4TdV (dx and dW) -- the useful work, credited to every implementation
    flops = 6 * t * d * v
    steps = [
        (name, (lambda loss_fn=loss_fn: loss_fn().backward())) for name, loss_fn in impls.items()
    ]
    n_rounds = H.rounds((7 if quick else 15) if not cuda else 30)
    times = H.measure_interleaved(
        report, case, steps, device, params, rounds=n_rounds, flops={name: flops for name in impls}
    )
    mem = {}
    for r in report.results[-len(times) :]:
        step = dict(steps)[r.impl]
        try:  # after the timed (warm) calls: compilation / autotuning / workspaces are not charged
            mem[r.impl] = H.peak_memory(step, device)
        except Exception as e:  # noqa: BLE001 -- e.g. a peer that runs out of memory
            print(
                f"\n[cross_entropy] {case} / {r.impl}: memory skipped ({type(e).__name__}: "
                f"{str(e)[:200]})",
                file=sys.stderr,
            )
            continue
        finally:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        r.params = dict(
            r.params,
            peak_memory_bytes=mem[r.impl]["bytes"],
            peak_memory_method=mem[r.impl]["method"],
        )
        print(
            f"[cross_entropy] {case} / {r.impl}: peak memory of the step "
            f"{mem[r.impl]['bytes'] / 2**20:.1f} MiB",
            file=sys.stderr,
        )
    tg = not quick  # the targets are for the full shapes; --quick reports its ratios without them
    if FUSED in mem and NAIVE in mem:
        H.add_memory_ratio(
            report,
            case,
            "naive peak memory / fused peak",
            mem[NAIVE],
            mem[FUSED],
            8.0 if tg else None,
        )
    H.add_speed_ratio(
        report,
        case,
        "naive time / fused time",
        times,
        NAIVE,
        FUSED,
        round(1 / 1.2, 4) if tg and not cuda else None,
    )
    H.add_speed_ratio(
        report, case, "Liger time / fused time", times, LIGER, FUSED, 1.0 if tg else None
    )
    if FUSED in mem and LIGER in mem:
        H.add_memory_ratio(report, case, "Liger peak memory / fused peak", mem[LIGER], mem[FUSED])
    H.add_speed_ratio(report, case, "compiled naive time / fused time", times, COMPILED, FUSED)
    H.add_speed_ratio(report, case, "CCE time / fused time", times, CCE, FUSED)
    if FUSED in mem and CCE in mem:
        H.add_memory_ratio(
            report, case, "CCE peak memory / fused peak", mem[CCE], mem[FUSED], 1.0 if tg else None
        )
    H.write(report, out_dir, device, plot)
    return report


if __name__ == "__main__":
    H.cli(run)
