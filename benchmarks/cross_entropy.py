"""Fused linear cross-entropy (``longtune.linear_cross_entropy(x, weight, target)``) vs the naive
eager path ``F.cross_entropy(x @ weight.T, target)``, side by side: one training step = forward +
backward of x (T, d) and weight (V, d) (their ``.grad`` buffers pre-allocated, so the gradients
themselves are not charged to either implementation).

Time: median of the harness timer, both implementations on the same inputs in the same run.
Peak memory:
 - CPU: a fresh subprocess per implementation; growth of ``ru_maxrss`` (the OS's peak RSS) across
   one full-size training step, read after the tensors and their ``.grad`` buffers exist and after
   a tiny warm-up call of *both* paths (thread pools, BLAS buffers) -- the pattern of
   tests/test_cross_entropy.py::_MEM_SCRIPT;
 - GPU: ``torch.cuda.max_memory_allocated`` over one step (stats reset before each implementation),
   minus what was allocated before it.
GPU peers: the naive path and Liger's ``LigerFusedLinearCrossEntropyLoss`` (skipped with a message
when ``liger_kernel`` is not importable).

Issue targets. CPU (fp32, T=4096, d=1024, V=32000): naive peak / fused peak >= 8, fused time <= 1.2x
naive (reported as naive time / fused time >= 1/1.2). GPU (bf16, T=8192, d=4096, V=128000): peak
<= 1/8 of naive (naive peak / fused peak >= 8), time <= 1.0x Liger (Liger time / fused time >= 1).

Run: ``python benchmarks/cross_entropy.py [--device cpu|cuda] [--out DIR] [--quick]``.
"""
from __future__ import annotations

import subprocess
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import longtune  # noqa: E402
from benchmarks import harness as H  # noqa: E402

FUSED = "longtune fused linear CE"
NAIVE = "naive F.cross_entropy(x @ W.T)"
LIGER = "Liger FusedLinearCrossEntropy"

# one training step in a fresh process; prints the peak-RSS growth (KiB) of that step
_MEM_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import longtune
impl, T, d, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
x = torch.randn(T, d, generator=g).requires_grad_()
w = (torch.randn(V, d, generator=g) / d ** 0.5).requires_grad_()
t = torch.randint(0, V, (T,), generator=g)
w.grad = torch.zeros_like(w); x.grad = torch.zeros_like(x)  # the gradients themselves are not extra
longtune.linear_cross_entropy(x[:4], w[:64], t[:4] % 64).backward()  # thread pools, BLAS buffers
torch.nn.functional.cross_entropy(x[:4] @ w[:64].T, t[:4] % 64).backward()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if impl == "fused":
    longtune.linear_cross_entropy(x, w, t).backward()
else:
    torch.nn.functional.cross_entropy(x @ w.T, t).backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


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


def _cpu_peak_bytes(impl: str, t: int, d: int, v: int) -> int:
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT.format(root=str(ROOT / "python")), impl,
                          str(t), str(d), str(v)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024  # ru_maxrss is in KiB on Linux


def _cuda_peak_bytes(step) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        print(f"\n[cross_entropy] {LIGER}: skipped (liger_kernel not importable: {e})", file=sys.stderr)
        return None
    return LigerFusedLinearCrossEntropyLoss()


def run(device: str, out_dir: str, quick: bool = False) -> H.Report:
    report = H.Report("cross_entropy")
    cuda = device == "cuda"
    if cuda:
        t, d, v, dtype = (8192, 4096, 128000, torch.bfloat16) if not quick else (2048, 1024, 32000, torch.bfloat16)
    else:
        t, d, v, dtype = (4096, 1024, 32000, torch.float32) if not quick else (1024, 256, 8000, torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(t, d, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device=device, generator=g) / d**0.5).to(dtype).requires_grad_()
    tgt = torch.randint(0, v, (t,), device=device, generator=g)
    x.grad, w.grad = torch.zeros_like(x), torch.zeros_like(w)

    impls = {FUSED: lambda: longtune.linear_cross_entropy(x, w, tgt),
             NAIVE: lambda: F.cross_entropy(x @ w.T, tgt)}
    if cuda:
        liger = _liger_loss()
        if liger is not None:
            impls[LIGER] = lambda: liger(w, x, tgt)  # Liger's signature: (lin_weight, _input, target)

    case = f"T={t} d={d} V={v} {str(dtype).removeprefix('torch.')}"
    params = {"T": t, "d": d, "V": v, "dtype": str(dtype)}
    # fwd: 2TdV (logits); bwd: 4TdV (dx and dW) -- the useful work, credited to every implementation
    flops = 6 * t * d * v
    min_time_s = 0.25 if cuda else (1.0 if quick else 0.5)
    res, mem = {}, {}
    if not cuda:
        # round-robin, compared round by round: the machine's speed drifts by +-20% over the seconds
        # that timing one implementation after the other would take
        steps = [(name, (lambda loss_fn=loss_fn: loss_fn().backward())) for name, loss_fn in impls.items()]
        for name in impls:
            mem[name] = _cpu_peak_bytes("fused" if name == FUSED else "naive", t, d, v)
        rounds = int(os.environ.get("LT_BENCH_ROUNDS", 5 if quick else 9))
        times = H.measure_interleaved(report, case, steps, device, params, rounds=rounds,
                                      flops={name: flops for name in impls})
        for r in report.results[-len(steps):]:
            res[r.impl] = r
            r.params = dict(params, peak_memory_bytes=mem[r.impl],
                            peak_memory_method="ru_maxrss growth, fresh subprocess")
        impls = {}  # timed above
    for name, loss_fn in H.progress(list(impls.items()), "cross_entropy"):
        def step(loss_fn=loss_fn):
            loss_fn().backward()

        try:
            if not cuda:
                mem[name] = _cpu_peak_bytes("fused" if name == FUSED else "naive", t, d, v)
            res[name] = H.measure(report, case, name, step, device, params, flops, min_time_s=min_time_s)
            if cuda:  # after the timed (warm) calls: compilation / autotuning / workspaces are not charged
                mem[name] = _cuda_peak_bytes(step)
            res[name].params = dict(params, peak_memory_bytes=mem[name],
                                    peak_memory_method="cuda.max_memory_allocated" if cuda
                                    else "ru_maxrss growth, fresh subprocess")
        except Exception as e:  # noqa: BLE001 -- e.g. a peer that runs out of memory
            print(f"\n[cross_entropy] {case} / {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                  file=sys.stderr)
            traceback.print_exc()
        finally:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    if FUSED in res and NAIVE in res:
        H.add_ratio(report, case, "naive peak memory / fused peak", mem[NAIVE] / max(mem[FUSED], 1), 8.0)
        H.add_ratio(report, case, "naive time / fused time",
                    res[NAIVE].median_ms / res[FUSED].median_ms if cuda else H.paired_ratio(times, NAIVE, FUSED),
                    None if cuda else round(1 / 1.2, 4))
    if FUSED in res and LIGER in res:
        H.add_ratio(report, case, "Liger time / fused time", res[LIGER].median_ms / res[FUSED].median_ms, 1.0)
        H.add_ratio(report, case, "Liger peak memory / fused peak", mem[LIGER] / max(mem[FUSED], 1))
    for name in res:
        print(f"[cross_entropy] {case} / {name}: peak memory of the step {mem[name] / 2**20:.1f} MiB")
    H.write(report, out_dir, device, plot)
    return report


if __name__ == "__main__":
    H.cli(run)
