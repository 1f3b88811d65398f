"""Prints the README's results table (markdown) from benchmarks/results/hadamard_<device>.json."""
import json
import sys
from pathlib import Path

dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
doc = json.loads((Path(__file__).resolve().parent / "results" / f"hadamard_{dev}.json").read_text())
by = {}
for r in doc["results"]:
    by.setdefault(r["params"]["n"], {})[r["impl"]] = r
for n, impls in by.items():
    ours, dense, clone = impls["longtune"], impls.get("torch dense x @ H"), impls["torch.clone"]
    sp = f"{dense['median_ms'] / ours['median_ms']:.1f}×" if dense else "–"
    print(f"| {n} | {ours['median_ms']:.1f} ms | {dense['median_ms']:.1f} ms |" if dense else
          f"| {n} | {ours['median_ms']:.1f} ms | – |", f"{sp} | {clone['median_ms'] / ours['median_ms']:.0%} |")
