"""Benchmark harness shared by every family: paired timing (CPU and GPU), memory by accounting,
ratios with a 95% interval and a verdict, a JSON schema with the run's provenance, CSV, PNG plots,
baselines and the regression gate.

Instruments (docs/benchmarks.md explains each):
 - time: :func:`measure_interleaved` - the implementations of a case run round-robin (one sample of
   each per round, the order rotated every round), so a slow phase of a shared machine hits all of
   them alike; a sample is the mean of enough calls to last ``min_sample_ms``;
 - speed ratio: :func:`add_speed_ratio` - the median over rounds of the per-round ratio, with a
   rank-based (distribution-free, binomial order-statistic) 95% interval of that median;
 - memory: :func:`peak_memory` - the peak of bytes allocated during one call above the level at its
   start, counted at the allocator (CPU: the profiler's allocation events; GPU:
   ``torch.cuda.max_memory_allocated``), deterministic to the byte for a fixed shape; the method is
   recorded beside every figure;
 - verdict: "met" (the interval lies at or above the target), "not met" (below), "undecided"
   (the interval straddles it). Every ratio is oriented so that higher is better.

JSON schema 2 (<out>/<benchmark>_<device>.json):
  {"benchmark", "schema": 2, "device", "device_kind": "cpu"|"cuda", "machine", "torch",
   "longtune_commit", "timestamp", "threads", "mode": "quick"|"full",
   "results": [{"case", "impl", "params", "median_ms", "p20_ms", "p80_ms", "flops", "bytes",
                "tflops", "gbps"}],
   "ratios": [{"case", "metric", "kind": "time"|"memory"|"other", "value", "lo", "hi", "coverage",
               "rounds", "method", "target", "verdict": "met"|"not met"|"undecided"|null,
               "met": bool|null}]}

Test hook: ``LT_BENCH_INJECT_SLOWDOWN="family:impl:factor[;...]"`` multiplies the recorded time of
every sample of the matching implementation (``impl`` is an fnmatch pattern on its name) by
``factor`` - a synthetic regression to check that the gate catches it. Never set it otherwise.
``LT_BENCH_ROUNDS=n`` overrides every family's number of rounds.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import fnmatch
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

BENCH_DIR = Path(__file__).resolve().parent
BASELINES = BENCH_DIR / "baselines"
LEVEL = 0.95  # confidence of the ratio intervals


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
    quick: bool = False


# ----------------------------------------------------------------------------- provenance
def _commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=BENCH_DIR,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=BENCH_DIR,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> float | None:
    """The 1-minute load average when the family finished (other processes competing for the cores
    shift ratios between runs; recorded beside the figures)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def machine(device: str) -> str:
    """What the figures were measured on: CPU model, cores, memory (and the GPU when used)."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = float("nan")
    s = (
        f"{_cpu_model()}, {os.cpu_count()} cores, {mem:.0f} GiB, "
        f"{platform.system()} {platform.machine()}"
    )
    if device == "cuda":
        s += f"; {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return s


# ----------------------------------------------------------------------------- timing
def rounds(default: int) -> int:
    """The number of interleaved rounds: ``default`` unless LT_BENCH_ROUNDS overrides it."""
    return int(os.environ.get("LT_BENCH_ROUNDS", default))


def injected_slowdown(family: str, impl: str) -> float:
    """The factor LT_BENCH_INJECT_SLOWDOWN asks for on (family, impl); 1.0 when none (test hook)."""
    spec = os.environ.get("LT_BENCH_INJECT_SLOWDOWN", "")
    factor = 1.0
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        fam, _, rest = item.partition(":")
        pat, _, f = rest.rpartition(":")
        if fam == family and fnmatch.fnmatchcase(impl, pat):
            factor *= float(f)
    return factor


def _quantiles(times_ms):
    times_ms = sorted(times_ms)
    if len(times_ms) == 1:
        return times_ms[0], times_ms[0], times_ms[0]
    q = statistics.quantiles(times_ms, n=10, method="inclusive")  # deciles
    return statistics.median(times_ms), q[1], q[7]  # median, 20th, 80th percentile


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_rounds(
    family: str, impls, device: str, n_rounds: int, min_sample_ms: float = 0.0, warmup: bool = True
) -> dict:
    """The timing core: ``impls`` [(name, fn)] run round-robin, ``n_rounds`` rounds, the order
    rotated every round; one sample per implementation per round = the mean time of ``calls`` calls
    (calibrated on the warm-up so that a sample lasts >= min_sample_ms). Returns
    {name: {"ms": [per round], "calls": int}}; an implementation that raises in its warm-up is
    left out with a message (a missing peer must not sink the others)."""
    live = []
    for name, fn in impls:
        if not warmup:
            live.append((name, fn, 1))
            continue
        try:
            fn()  # warm-up (compilation, thread pools, caches)
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            once = (time.perf_counter() - t0) * 1e3
        except Exception as e:  # noqa: BLE001
            print(
                f"\n[{family}] {name}: skipped ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''})",
                file=sys.stderr,
            )
            continue
        live.append(
            (name, fn, max(1, math.ceil(min_sample_ms / max(once, 1e-6))) if min_sample_ms else 1)
        )
    slow = {name: injected_slowdown(family, name) for name, _, _ in live}
    out = {name: {"ms": [], "calls": calls} for name, _, calls in live}
    for r in range(n_rounds):
        for i in range(len(live)):
            name, fn, calls = live[(i + r) % len(live)]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            _sync(device)
            out[name]["ms"].append((time.perf_counter() - t0) * 1e3 / calls * slow[name])
    return out


def measure_interleaved(
    report: Report,
    case: str,
    impls,
    device: str,
    params: dict | None,
    rounds: int = 7,
    flops: dict | None = None,
    impl_params: dict | None = None,
    nbytes: dict | None = None,
    min_sample_ms: float | None = None,
) -> dict:
    """Time several implementations of one case round-robin (see :func:`timed_rounds`) and record
    (median, p20, p80) per implementation. Returns {name: [ms per round]}, aligned by round, for
    :func:`add_speed_ratio`. ``flops`` / ``nbytes`` ({name: int}) give TFLOP/s and GB/s;
    ``impl_params`` ({name: dict}) overrides ``params`` per implementation."""
    if min_sample_ms is None:
        min_sample_ms = 20.0
    got = timed_rounds(report.benchmark, impls, device, rounds, min_sample_ms)
    for name, g in got.items():
        med, p20, p80 = _quantiles(g["ms"])
        f = (flops or {}).get(name, 0)
        nb = (nbytes or {}).get(name, 0)
        p = dict(
            (impl_params or {}).get(name, params) or {}, rounds=rounds, calls_per_sample=g["calls"]
        )
        report.results.append(
            Result(
                case,
                name,
                p,
                med,
                p20,
                p80,
                f,
                nb,
                tflops=f / (med * 1e-3) / 1e12 if f else 0.0,
                gbps=nb / (med * 1e-3) / 1e9 if nb else 0.0,
            )
        )
    return {name: g["ms"] for name, g in got.items()}


# ----------------------------------------------------------------------------- memory
CPU_MEMORY_METHOD = (
    "peak allocated bytes above the start, CPU allocator events (torch.profiler profile_memory)"
)
CUDA_MEMORY_METHOD = "peak allocated bytes above the start, torch.cuda.max_memory_allocated"


def peak_memory(step: Callable[[], object], device: str) -> dict:
    """{"bytes", "method"}: the peak, over one call of ``step``, of the bytes allocated by the
    framework's allocator above the level at the call's start - what a training step adds to what
    already exists. GPU: ``torch.cuda.max_memory_allocated`` after a reset; CPU: the profiler's
    allocation events (every tensor allocation and free, in order, summed). Counted, not sampled
    from the OS: deterministic to the byte for fixed shapes, zero only for a call that allocates
    nothing, blind to the allocator's slack and to C++ scratch that is not a tensor (std::vector).
    The one memory instrument of every family."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {
            "bytes": int(torch.cuda.max_memory_allocated() - base),
            "method": CUDA_MEMORY_METHOD,
        }
    from torch.profiler import ProfilerActivity, profile

    cpu = torch._C._autograd.DeviceType.CPU
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    evs = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    )
    live = peak = 0
    for _, nb in evs:
        live += nb
        peak = max(peak, live)
    return {"bytes": int(peak), "method": CPU_MEMORY_METHOD}


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (e.g. an optimizer's state, which persists
    between steps and so is not part of one step's peak)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for st in opt.state.values() for v in st.values())


# ----------------------------------------------------------------------------- ratios
def median_interval(samples, level: float = LEVEL) -> tuple:
    """(median, lo, hi, coverage): the sample median and the distribution-free interval of the
    population median from order statistics [x_(k), x_(n+1-k)], k the largest with binomial
    coverage 1 - 2 P(Bin(n, 1/2) <= k-1) >= level. With too few samples (n <= 5 for 95%) it is
    [min, max] and ``coverage`` says what that achieves."""
    xs = sorted(samples)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval: no samples")
    med = statistics.median(xs)
    if n == 1:
        return med, xs[0], xs[0], 0.0
    k, cov, cdf = 1, 1 - 2 * 0.5**n, 0.0
    for j in range(1, n // 2 + 1):  # interval [x_(j), x_(n+1-j)] has coverage 1 - 2 P(B <= j-1)
        cdf += math.comb(n, j - 1) * 0.5**n
        c = 1 - 2 * cdf
        if c >= level:
            k, cov = j, c
        else:
            break
    return med, xs[k - 1], xs[n - k], cov


def verdict(lo: float, hi: float, target: float | None) -> str | None:
    """ "met" when the whole interval is at or above the target, "not met" when it is below,
    "undecided" when it straddles it; None without a target."""
    if target is None:
        return None
    if lo >= target:
        return "met"
    if hi < target:
        return "not met"
    return "undecided"


def add_ratio(
    report: Report,
    case: str,
    metric: str,
    value: float,
    target: float | None = None,
    *,
    lo: float | None = None,
    hi: float | None = None,
    kind: str = "other",
    coverage: float | None = None,
    rounds: int | None = None,
    method: str = "",
    **extra,
) -> dict:
    """Record a ratio (higher is better) with its interval [lo, hi] (a point when exact) and the
    verdict against ``target``."""
    lo = value if lo is None else lo
    hi = value if hi is None else hi
    v = verdict(lo, hi, target)
    q = {
        "case": case,
        "metric": metric,
        "kind": kind,
        "value": value,
        "lo": lo,
        "hi": hi,
        "coverage": coverage,
        "rounds": rounds,
        "method": method,
        "target": target,
        "verdict": v,
        "met": None if v is None else v == "met",
        **extra,
    }
    report.ratios.append(q)
    return q


def paired_ratios(times: dict, num: str, den: str) -> list:
    return [a / b for a, b in zip(times[num], times[den])]


def paired_ratio(times: dict, num: str, den: str) -> float:
    """Median over rounds of times[num][r] / times[den][r] (robust to drifting machine speed)."""
    return statistics.median(paired_ratios(times, num, den))


def add_speed_ratio(
    report: Report,
    case: str,
    metric: str,
    times: dict,
    num: str,
    den: str,
    target: float | None = None,
    scale: float = 1.0,
) -> dict | None:
    """The speed ratio time(num) / time(den) (x ``scale``) as the median of the per-round ratios of
    interleaved rounds, with its rank-based 95% interval and verdict. None (nothing recorded)
    when either implementation is missing (skipped)."""
    if num not in times or den not in times:
        return None
    rs = [r * scale for r in paired_ratios(times, num, den)]
    med, lo, hi, cov = median_interval(rs)
    return add_ratio(
        report,
        case,
        metric,
        med,
        target,
        lo=lo,
        hi=hi,
        kind="time",
        coverage=round(cov, 4),
        rounds=len(rs),
        method="median of per-round ratios, interleaved rounds; rank-based interval",
    )


def add_memory_ratio(
    report: Report, case: str, metric: str, num: dict, den: dict, target: float | None = None
) -> dict:
    """num["bytes"] / den["bytes"] from :func:`peak_memory` figures: exact (the interval is the
    point), the two byte counts and the method recorded beside it."""
    if den["bytes"] <= 0:
        raise ValueError(
            f"{report.benchmark} / {case} / {metric}: the denominator allocated nothing "
            f"({den}); a step that allocates never reads zero, so the measurement is broken"
        )
    return add_ratio(
        report,
        case,
        metric,
        num["bytes"] / den["bytes"],
        target,
        kind="memory",
        method=den["method"],
        num_bytes=num["bytes"],
        den_bytes=den["bytes"],
    )


# ----------------------------------------------------------------------------- output
def default_out_dir() -> str:
    """Where a run writes unless told: ./bench-results/<UTC stamp>/ (ignored by git)."""
    return str(
        Path("bench-results") / _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    )


def write(
    report: Report, out_dir: str | os.PathLike, device: str, plot: Callable | None = None
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{report.benchmark}_{device}"
    doc = {
        "benchmark": report.benchmark,
        "schema": 2,
        "device": device_name(device),
        "device_kind": device,
        "machine": machine(device),
        "torch": torch.__version__,
        "longtune_commit": _commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "mode": "quick" if report.quick else "full",
        "load_avg_1min": _load(),
        "cpu_count": os.cpu_count(),
        "results": [asdict(r) for r in report.results],
        "ratios": report.ratios,
    }
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "impl", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "params"])
        for r in report.results:
            w.writerow(
                [
                    r.case,
                    r.impl,
                    f"{r.median_ms:.5f}",
                    f"{r.p20_ms:.5f}",
                    f"{r.p80_ms:.5f}",
                    f"{r.tflops:.4f}",
                    f"{r.gbps:.3f}",
                    json.dumps(r.params),
                ]
            )
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
    rep = Report(
        doc["benchmark"],
        [Result(**r) for r in doc["results"]],
        doc["ratios"],
        doc.get("mode") == "quick",
    )
    return rep, doc["device"]


def fmt_ratio(q: dict) -> str:
    """ "1.52 [1.41, 1.63]" (a point when exact)."""
    v, lo, hi = q["value"], q.get("lo", q["value"]), q.get("hi", q["value"])
    if lo is None or hi is None or (lo == v == hi):
        return f"{v:.2f}"
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]"


def print_table(report: Report):
    print(f"\n== {report.benchmark} ==")
    wc = (
        max([4] + [len(r.case) for r in report.results] + [len(q["case"]) for q in report.ratios])
        + 2
    )
    wi = max([4] + [len(r.impl) for r in report.results]) + 2
    print(
        f"{'case':<{wc}}{'impl':<{wi}}{'median ms':>11}{'p20':>10}{'p80':>10}"
        f"{'GB/s':>9}{'TFLOP/s':>9}"
    )
    for r in report.results:
        print(
            f"{r.case:<{wc}}{r.impl:<{wi}}{r.median_ms:>11.4f}{r.p20_ms:>10.4f}{r.p80_ms:>10.4f}"
            f"{r.gbps:>9.1f}{r.tflops:>9.3f}"
        )
    if report.ratios:
        wm = max(len(q["metric"]) for q in report.ratios) + 2
        print("ratios (median [95% interval]; higher is better):")
        for q in report.ratios:
            tgt = "" if q["target"] is None else f"  target >= {q['target']:g}: {q['verdict']}"
            print(f"  {q['case']:<{wc}}{q['metric']:<{wm}}{fmt_ratio(q):>22}{tgt}")


def summary(reports, total_s: float) -> str:
    """The end-of-run summary: every ratio with a target, its interval and verdict; the total
    time."""
    lines = [
        f"{'family':<14}{'case':<36}{'metric':<48}{'median [95% interval]':>24}  {'target':>8}  "
        "verdict"
    ]
    counts = {}
    for rep in reports:
        for q in rep.ratios:
            if q["target"] is None:
                continue
            counts[q["verdict"]] = counts.get(q["verdict"], 0) + 1
            lines.append(
                f"{rep.benchmark:<14}{q['case'][:35]:<36}{q['metric'][:47]:<48}{fmt_ratio(q):>24}  "
                f">= {q['target']:<5g}  {q['verdict']}"
            )
    tally = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    lines.append(f"targets: {tally or 'none'}; total time {total_s:.0f} s")
    return "\n".join(lines)


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
    ap.add_argument(
        "--out", default=None, help="output folder (default ./bench-results/<UTC stamp>/)"
    )
    ap.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    a = ap.parse_args()
    print_table(run(a.device, a.out or default_out_dir(), a.quick))


# ----------------------------------------------------------------------------- baselines and the
# gate
def baseline_dir(device: str, quick: bool) -> Path:
    """benchmarks/baselines/<device_kind>/ (full runs) or .../<device_kind>/quick/ (--quick
    runs)."""
    d = BASELINES / device
    return d / "quick" if quick else d


def load_docs(folder: str | os.PathLike, device: str) -> dict:
    """{benchmark: JSON document} of the <benchmark>_<device>.json files in ``folder``."""
    docs = {}
    for p in sorted(Path(folder).glob(f"*_{device}.json")):
        doc = json.loads(p.read_text())
        if "benchmark" in doc:
            docs[doc["benchmark"]] = doc
    return docs


def update_baseline(out_dir: str | os.PathLike, device: str, quick: bool, families) -> Path:
    """Copy this run's files of ``families`` (JSON, CSV, PNG) into the baseline folder."""
    import shutil

    dst = baseline_dir(device, quick)
    dst.mkdir(parents=True, exist_ok=True)
    for fam in families:
        for ext in ("json", "csv", "png"):
            src = Path(out_dir) / f"{fam}_{device}.{ext}"
            if src.exists():
                shutil.copyfile(src, dst / src.name)
    return dst


def _kind(q: dict) -> str:
    if "kind" in q:
        return q["kind"]
    m = q["metric"].lower()  # schema 1 (no kind recorded)
    return "memory" if ("memory" in m or "peak" in m) else "time"


def compare(
    run_docs: dict, base_docs: dict, tol_time: float = 0.10, tol_memory: float = 0.01
) -> list:
    """The gate's comparison, ratio by ratio (family, case, metric), of a run with the baselines.
    Status of a time or memory ratio (higher is better), [lo, hi] the 95% intervals (a point for
    memory and for baselines recorded without one):
      "REGRESSION" - the run's whole interval lies below the baseline's, by more than the
                     tolerance: run.hi < baseline.lo x (1 - tol);
      "improved"   - run.lo > baseline.hi x (1 + tol);
      "ok"         - otherwise;
      "new" / "missing" - only in the run / only in the baseline (a peer not installed, a case
                          renamed), "method changed" - a memory figure counted another way.
    Both intervals count because a shared machine's load shifts ratios between runs by more
    than one run's interval shows (a BLAS peer and a bandwidth-bound kernel slow down
    differently). Ratios of kind "other" are listed, never judged. Absolute times are never
    compared."""
    rows = []
    for fam in sorted(set(run_docs) | set(base_docs)):
        run_q = {(q["case"], q["metric"]): q for q in run_docs.get(fam, {}).get("ratios", [])}
        base_q = {(q["case"], q["metric"]): q for q in base_docs.get(fam, {}).get("ratios", [])}
        for key in list(run_q) + [k for k in base_q if k not in run_q]:
            q, b = run_q.get(key), base_q.get(key)
            kind = _kind(q or b)
            row = {
                "family": fam,
                "case": key[0],
                "metric": key[1],
                "kind": kind,
                "base": None if b is None else b["value"],
                "base_lo": None if b is None else b.get("lo", b["value"]),
                "base_hi": None if b is None else b.get("hi", b["value"]),
                "value": None if q is None else q["value"],
                "lo": None if q is None else q.get("lo", q["value"]),
                "hi": None if q is None else q.get("hi", q["value"]),
            }
            if b is None:
                row["status"] = "new"
            elif q is None:
                row["status"] = "missing"
            elif kind == "memory" and b.get("method") != q.get("method"):
                row["status"] = "method changed"
            elif kind not in ("time", "memory"):
                row["status"] = "-"
            else:
                tol = tol_time if kind == "time" else tol_memory
                b_lo = b["value"] if b.get("lo") is None else b["lo"]
                b_hi = b["value"] if b.get("hi") is None else b["hi"]
                if row["hi"] < b_lo * (1 - tol):
                    row["status"] = "REGRESSION"
                elif row["lo"] > b_hi * (1 + tol):
                    row["status"] = "improved"
                else:
                    row["status"] = "ok"
            rows.append(row)
    return rows


def gate_table(rows: list) -> str:
    lines = [
        f"{'status':<15}{'family':<14}{'case':<36}{'metric':<48}{'baseline [95% interval]':>24}  "
        f"{'this run [95% interval]':>24}{'change':>8}"
    ]
    order = {
        "REGRESSION": 0,
        "improved": 1,
        "method changed": 2,
        "missing": 3,
        "new": 4,
        "ok": 5,
        "-": 6,
    }
    for r in sorted(rows, key=lambda r: order.get(r["status"], 9)):
        if r["base"] is None:
            base = "-"
        elif r.get("base_lo") is None or r["base_lo"] == r["base"] == r["base_hi"]:
            base = f"{r['base']:.2f}"
        else:
            base = f"{r['base']:.2f} [{r['base_lo']:.2f}, {r['base_hi']:.2f}]"
        if r["value"] is None:
            cur = "-"
        elif r["lo"] == r["value"] == r["hi"]:
            cur = f"{r['value']:.2f}"
        else:
            cur = f"{r['value']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"
        chg = (
            "" if r["base"] is None or r["value"] is None else f"{r['value'] / r['base'] - 1:+.0%}"
        )
        lines.append(
            f"{r['status']:<15}{r['family']:<14}{r['case'][:35]:<36}{r['metric'][:47]:<48}"
            f"{base:>24}  {cur:>24}{chg:>8}"
        )
    n_reg = sum(r["status"] == "REGRESSION" for r in rows)
    n_cmp = sum(r["status"] in ("ok", "improved", "REGRESSION") for r in rows)
    lines.append(
        f"gate: {n_reg} regression(s) among {n_cmp} compared ratios -> "
        f"{'FAIL' if n_reg else 'pass'}"
    )
    return "\n".join(lines)


def gate_failed(rows: list) -> bool:
    return any(r["status"] == "REGRESSION" for r in rows)


# ----------------------------------------------------------------------------- shared peers
class LoRALinear(torch.nn.Module):
    """The LoRA peer (peft's formulation): frozen base + (x A^T) B^T, A random, B zero."""

    def __init__(self, base: torch.nn.Linear, r: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.A = torch.nn.Parameter(
            torch.randn(r, base.in_features, device=dev, dtype=dt) / base.in_features**0.5
        )
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dt))

    def forward(self, x):
        return self.base(x) + (x @ self.A.T) @ self.B.T
