"""Benchmark harness shared by every family: timing (CPU and GPU), FLOP/byte counters, a JSON
schema with the run's provenance, CSV, PNG plots and a short printed table.

JSON schema (benchmarks/results/<name>.json):
  {"benchmark": str, "schema": 1, "device": str, "device_kind": "cpu"|"cuda", "torch": str,
   "longtune_commit": str, "timestamp": str, "threads": int,
   "results": [{"case": str, "impl": str, "params": {...}, "median_ms": float,
                "p20_ms": float, "p80_ms": float, "flops": int, "bytes": int,
                "tflops": float, "gbps": float}],
   "ratios": [{"case": str, "metric": str, "value": float, "target": float|null, "met": bool|null}]}
Every impl of a case is timed in the same run, one after the other, on the same inputs.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Result:
    case: str
    impl: str
    params: dict
    median_ms: float
    p20_ms: float
    p80_ms: float
    flops: int = 0
    bytes: int = 0
    tflops: float = 0.0
    gbps: float = 0.0


@dataclass
class Report:
    benchmark: str
    results: list = field(default_factory=list)
    ratios: list = field(default_factory=list)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except Exception:
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _quantiles(times_ms):
    times_ms = sorted(times_ms)
    if len(times_ms) == 1:
        return times_ms[0], times_ms[0], times_ms[0]
    q = statistics.quantiles(times_ms, n=10, method="inclusive")  # deciles
    return statistics.median(times_ms), q[1], q[7]  # median, 20th, 80th percentile


def time_fn(fn: Callable[[], object], device: str, min_time_s: float = 0.25) -> tuple:
    """(median, p20, p80) in milliseconds. GPU: CUDA events around each call after warm-up
    (triton.testing.do_bench when available). CPU: torch.utils.benchmark blocks for min_time_s."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
            return float(med), float(p20), float(p80)
        except ImportError:
            pass
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(50):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return _quantiles(times)
    import torch.utils.benchmark as tb

    fn()  # warm-up
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_time_s)
    return _quantiles([t * 1e3 for t in m.times])


def measure(report: Report, case: str, impl: str, fn, device: str, params: dict, flops: int = 0,
            nbytes: int = 0, min_time_s: float = 0.25) -> Result:
    med, p20, p80 = time_fn(fn, device, min_time_s)
    r = Result(case, impl, params, med, p20, p80, flops, nbytes,
               tflops=flops / (med * 1e-3) / 1e12 if flops else 0.0,
               gbps=nbytes / (med * 1e-3) / 1e9 if nbytes else 0.0)
    report.results.append(r)
    return r


def measure_interleaved(report: Report, case: str, impls, device: str, params: dict, rounds: int = 7,
                        flops: dict | None = None, impl_params: dict | None = None) -> dict:
    """Time several implementations of one case round-robin (one call of each per round, the order
    rotated every round) so that a slow phase of a noisy shared machine hits all of them alike;
    record (median, p20, p80) per implementation and return {name: [ms per round]}, aligned by round
    so that `paired_ratio` can compare them round by round. `impl_params` ({name: dict}) overrides
    `params` per implementation."""
    import time

    impls = list(impls)
    for _, fn in impls:  # warm-up
        fn()
    times = {name: [] for name, _ in impls}
    for r in range(rounds):
        for i in range(len(impls)):
            name, fn = impls[(i + r) % len(impls)]
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1e3)
    for name, _ in impls:
        med, p20, p80 = _quantiles(times[name])
        f = (flops or {}).get(name, 0)
        report.results.append(Result(case, name, (impl_params or {}).get(name, params), med, p20, p80, f, 0,
                                     tflops=f / (med * 1e-3) / 1e12 if f else 0.0))
    return times


def paired_ratio(times: dict, num: str, den: str) -> float:
    """Median over rounds of times[num][r] / times[den][r] (robust to drifting machine speed)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def add_ratio(report: Report, case: str, metric: str, value: float, target: float | None = None):
    report.ratios.append({"case": case, "metric": metric, "value": value, "target": target,
                          "met": None if target is None else bool(value >= target)})


def write(report: Report, out_dir: str | os.PathLike, device: str, plot: Callable | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{report.benchmark}_{device}"
    doc = {
        "benchmark": report.benchmark, "schema": 1, "device": device_name(device), "device_kind": device,
        "torch": torch.__version__, "longtune_commit": _commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "results": [asdict(r) for r in report.results], "ratios": report.ratios,
    }
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "impl", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "params"])
        for r in report.results:
            w.writerow([r.case, r.impl, f"{r.median_ms:.5f}", f"{r.p20_ms:.5f}", f"{r.p80_ms:.5f}",
                        f"{r.tflops:.4f}", f"{r.gbps:.3f}", json.dumps(r.params)])
    if plot is not None:
        plot(report, out / f"{stem}.png", doc["device"])
    return out / f"{stem}.json"


def grouped_bars(title: str, log: bool = True) -> Callable:
    """A plot function for :func:`write`: one group of bars per case, one bar per implementation
    (median time)."""

    def plot(report: Report, path, device_name: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cases = list(dict.fromkeys(r.case for r in report.results))
        impls = list(dict.fromkeys(r.impl for r in report.results))
        fig, ax = plt.subplots(figsize=(max(9, 3 * len(cases)), 4.5))
        w = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for i, c in enumerate(cases):
                r = [r for r in report.results if r.case == c and r.impl == impl]
                if r:
                    xs.append(i + k * w)
                    ys.append(r[0].median_ms)
            ax.bar(xs, ys, width=w, label=impl)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cases))], cases, fontsize=8)
        ax.set_ylabel("median time, ms (lower is better)")
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{title} - {device_name}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    return plot


def load(path: str | os.PathLike) -> tuple:
    """(Report, device name) from a JSON written by :func:`write` (to re-plot it)."""
    doc = json.loads(Path(path).read_text())
    rep = Report(doc["benchmark"], [Result(**r) for r in doc["results"]], doc["ratios"])
    return rep, doc["device"]


def print_table(report: Report):
    print(f"\n== {report.benchmark} ==")
    print(f"{'case':<34}{'impl':<26}{'median ms':>11}{'p20':>10}{'p80':>10}{'GB/s':>9}{'TFLOP/s':>9}")
    for r in report.results:
        print(f"{r.case:<34}{r.impl:<26}{r.median_ms:>11.4f}{r.p20_ms:>10.4f}{r.p80_ms:>10.4f}"
              f"{r.gbps:>9.1f}{r.tflops:>9.3f}")
    if report.ratios:
        print("ratios:")
        for q in report.ratios:
            tgt = "" if q["target"] is None else f"  (target >= {q['target']}: {'met' if q['met'] else 'NOT met'})"
            print(f"  {q['case']:<34}{q['metric']:<40}{q['value']:>8.2f}{tgt}")


def progress(iterable, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, leave=False)
    except ImportError:
        return iterable


def cli(run: Callable) -> None:
    """The command line every family's benchmark script shares: --device, --out, --quick."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    a = ap.parse_args()
    print_table(run(a.device, a.out, a.quick))


def training_memory(model, x, loss_fn, trainable) -> int:
    """Bytes a training step adds on top of the model and its input: activations saved for backward
    (distinct storages that are not parameters / buffers / the input), gradients of the trainable
    tensors, and AdamW's two moments per trainable element. Counted exactly through autograd's
    saved-tensor hooks, so it works on CPU as well as GPU."""
    persistent = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in persistent:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x))
    loss.backward()
    grads = sum(p.numel() * p.element_size() for p in trainable)
    return sum(saved.values()) + 3 * grads


class LoRALinear(torch.nn.Module):
    """The LoRA peer (peft's formulation): frozen base + (x A^T) B^T, A random, B zero."""

    def __init__(self, base: torch.nn.Linear, r: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.A = torch.nn.Parameter(torch.randn(r, base.in_features, device=dev, dtype=dt) / base.in_features**0.5)
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dt))

    def forward(self, x):
        return self.base(x) + (x @ self.A.T) @ self.B.T
