"""Runs every family's benchmark on the present device (GPU if there is one, else CPU), writes
JSON + CSV + PNG into --out (default ./bench-results/<UTC stamp>/, outside version control) and ends
with one summary: every target with its 95% interval and verdict, and the total time.

  --update-baseline   also copy this run into benchmarks/baselines/<device>/ (--quick: .../quick/),
                      the committed reference (machine, torch, commit and date are in each JSON)
  --check             the regression gate: compare this run's ratios with the baselines of the same
                      mode; exit 1 (and a table) when a ratio's whole interval fell below its
                      baseline's interval by more than the tolerance
  --compare RUN_DIR   the gate on an existing run's folder, without running anything

One script per family; FAMILIES is the list. docs/benchmarks.md describes the figures.
Run from the repository root as ``python -m benchmarks`` (this package) or, anywhere in a source
checkout's environment, ``python -m longtune.bench`` / ``longtune-bench``; a progress bar over the
families when tqdm is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks import attention as bench_attention  # noqa: E402
from benchmarks import bench_hadamard  # noqa: E402
from benchmarks import chunkwise as bench_chunkwise  # noqa: E402
from benchmarks import cross_entropy as bench_cross_entropy  # noqa: E402
from benchmarks import harness as H  # noqa: E402
from benchmarks import quant as bench_quant  # noqa: E402
from benchmarks import s2ft as bench_s2ft  # noqa: E402
from benchmarks import sparse_delta as bench_sparse_delta  # noqa: E402

FAMILIES = {
    "hadamard": bench_hadamard.run,
    "quant": bench_quant.run,
    "sparse_delta": bench_sparse_delta.run,
    "s2ft": bench_s2ft.run,
    "attention": bench_attention.run,
    "cross_entropy": bench_cross_entropy.run,
    "chunkwise": bench_chunkwise.run,
}


def gate(
    run_dir,
    device: str,
    quick: bool,
    families,
    baseline: str | None,
    tol_time: float,
    tol_memory: float,
) -> int:
    """Prints the gate's table; 0 pass, 1 regression, 2 no baseline to compare with."""
    base_dir = Path(baseline) if baseline else H.baseline_dir(device, quick)
    base = {k: v for k, v in H.load_docs(base_dir, device).items() if k in families}
    run = {k: v for k, v in H.load_docs(run_dir, device).items() if k in families}
    if not base:
        print(
            f"\ngate: no baselines for {device} ({'quick' if quick else 'full'}) in {base_dir}; "
            f"record them with `python -m longtune.bench{' --quick' if quick else ''} "
            "--update-baseline`"
        )
        return 2
    rows = H.compare(run, base, tol_time, tol_memory)
    for fam in sorted(run):
        lr, lb = run[fam].get("load_avg_1min"), base.get(fam, {}).get("load_avg_1min")
        cores = run[fam].get("cpu_count") or 1
        if device == "cpu" and lr is not None and (lr > cores or (lb or 0) > cores):
            print(
                f"gate: note: {fam} ran at load average {lr} (baseline {lb}) on {cores} cores - "
                "other processes competed for the CPU, and ratios shift with the load; rerun on an "
                "idle machine before trusting a regression"
            )
    table = H.gate_table(rows)
    print(
        f"\n== regression gate: {run_dir} vs {base_dir} (tolerance: time {tol_time:.0%}, memory "
        f"{tol_memory:.0%}) =="
    )
    print(table)
    Path(run_dir, "gate.txt").write_text(table + "\n")
    return 1 if H.gate_failed(rows) else 0


class _NoProgress:
    def set_description(self, text):
        print(f"-- {text}", flush=True)

    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int):
    """A progress bar over the families (tqdm when installed, on stderr; TQDM_DISABLE=1 turns it
    off)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, unit="family", file=sys.stderr, dynamic_ncols=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m longtune.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--out", default=None, help="output folder (default ./bench-results/<UTC stamp>/)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="fewer, smaller cases (the whole suite in ~3 minutes)"
    )
    ap.add_argument(
        "--only", nargs="*", default=list(FAMILIES), choices=list(FAMILIES), metavar="FAMILY"
    )
    ap.add_argument(
        "--update-baseline", action="store_true", help="copy this run into benchmarks/baselines/"
    )
    ap.add_argument(
        "--check", action="store_true", help="the regression gate against the baselines"
    )
    ap.add_argument(
        "--compare", metavar="RUN_DIR", help="the gate on an existing run's folder (runs nothing)"
    )
    ap.add_argument(
        "--baseline",
        metavar="DIR",
        help="baseline folder (default benchmarks/baselines/<device>[/quick])",
    )
    ap.add_argument(
        "--tolerance", type=float, default=0.10, help="gate tolerance on time ratios (default 0.10)"
    )
    ap.add_argument(
        "--memory-tolerance", type=float, default=0.01, help="gate tolerance on memory ratios"
    )
    a = ap.parse_args(argv)
    if a.update_baseline and (a.check or a.compare):
        ap.error(
            "--update-baseline records a run as the reference; check it first in a separate run"
        )
    if a.compare:
        docs = H.load_docs(a.compare, a.device)
        quick = any(d.get("mode") == "quick" for d in docs.values()) if not a.quick else True
        return gate(
            a.compare,
            a.device,
            quick,
            [f for f in a.only if f in docs],
            a.baseline,
            a.tolerance,
            a.memory_tolerance,
        )

    out = a.out or H.default_out_dir()
    print(
        f"longtune benchmarks ({'quick' if a.quick else 'full'}) on {H.device_name(a.device)} -> "
        f"{out}"
    )
    t0 = time.perf_counter()
    reports, failed = [], []
    progress = _progress(len(a.only))
    for name in a.only:
        progress.set_description(f"benchmarks: {name}")
        t1 = time.perf_counter()
        try:
            rep = FAMILIES[name](a.device, out, a.quick)
        except Exception:  # noqa: BLE001 -- one broken family must not hide the others' results
            traceback.print_exc()
            failed.append(name)
            progress.update(1)
            continue
        H.print_table(rep)
        print(f"[{name}] {time.perf_counter() - t1:.0f} s")
        reports.append(rep)
        progress.update(1)
    progress.close()
    total = time.perf_counter() - t0
    text = H.summary(reports, total)
    print(f"\n== summary: targets, median [95% interval], verdict ==\n{text}")
    if failed:
        print(f"FAILED families: {' '.join(failed)}")
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "summary.txt").write_text(text + "\n")
    Path(out, "summary.json").write_text(
        json.dumps(
            {
                "device": a.device,
                "mode": "quick" if a.quick else "full",
                "total_s": round(total, 1),
                "failed": failed,
                "ratios": [dict(q, family=r.benchmark) for r in reports for q in r.ratios],
            },
            indent=1,
        )
    )
    print(f"results in {out}/")
    rc = 1 if failed else 0
    if a.update_baseline:
        dst = H.update_baseline(out, a.device, a.quick, [r.benchmark for r in reports])
        print(
            f"baselines updated: {dst}/ ({', '.join(r.benchmark for r in reports)}); review and "
            "commit them"
        )
    if a.check:
        rc = max(
            rc,
            gate(
                out,
                a.device,
                a.quick,
                [r.benchmark for r in reports],
                a.baseline,
                a.tolerance,
                a.memory_tolerance,
            ),
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())
