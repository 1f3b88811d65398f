"""Prints the results tables (markdown) from the committed baselines
(benchmarks/baselines/<device>/, or .../<device>/quick/ with --quick, or --dir DIR for any run's
folder): one table of every ratio with a target - median, 95% interval, target, verdict - with the
measuring machine, torch and commit of each family (the README's results table, between its
markers), and the Hadamard transform's per-size table (docs/benchmarks.md).

Run: ``python -m benchmarks.readme_table [cpu|cuda] [--quick] [--dir DIR] [--all]`` (--all: the
ratios without a target too)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import harness as H  # noqa: E402

ORDER = ["attention", "cross_entropy", "chunkwise", "sparse_delta", "s2ft", "quant", "hadamard"]


def _interval(q: dict) -> str:
    lo, hi = q.get("lo"), q.get("hi")
    if lo is None or hi is None:
        return "– (point estimate)"
    if lo == q["value"] == hi:
        return "exact" if q.get("kind") == "memory" else "–"
    return f"[{lo:.2f}, {hi:.2f}]"


def _verdict(q: dict) -> str:
    if q.get("verdict") is not None:
        return q["verdict"]
    if q.get("met") is None:
        return ""
    return ("met" if q["met"] else "not met") + " (point estimate)"


def ratios_table(docs: dict, with_untargeted: bool = False) -> str:
    lines = [
        "| family | case | ratio (higher is better) | median | 95% interval | target | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for fam in sorted(docs, key=lambda f: ORDER.index(f) if f in ORDER else len(ORDER)):
        for q in docs[fam]["ratios"]:
            if q.get("target") is None and not with_untargeted:
                continue
            tgt = "" if q.get("target") is None else f"≥ {q['target']:g}"
            lines.append(
                f"| {fam} | {q['case']} | {q['metric']} | {q['value']:.2f} | {_interval(q)} | "
                f"{tgt} | {_verdict(q)} |"
            )
    return "\n".join(lines)


def provenance(docs: dict) -> str:
    lines = []
    for fam in sorted(docs, key=lambda f: ORDER.index(f) if f in ORDER else len(ORDER)):
        d = docs[fam]
        lines.append(
            f"- {fam}: {d.get('machine') or d['device']}, torch {d['torch']}, commit "
            f"{d['longtune_commit']}, {d['timestamp'][:10]}, {d.get('mode', 'full')} run"
        )
    return "\n".join(lines)


def hadamard_table(doc: dict) -> str:
    by = {}
    for r in doc["results"]:
        by.setdefault(r["params"]["n"], {})[r["impl"]] = r
    lines = [
        "| n | longtune | dense `x @ H` | speedup vs dense | fraction of `torch.clone` bandwidth |",
        "|---|---|---|---|---|",
    ]
    ratio = {(q["case"], q["metric"]): q for q in doc["ratios"]}
    for n, impls in by.items():
        ours, dense = impls["longtune"], impls.get("torch dense x @ H")
        case = ours["case"]
        sp = ratio.get((case, "speedup vs dense x @ H"))
        bw = ratio.get((case, "fraction of torch.clone bandwidth"))
        sp_s = (
            "–"
            if sp is None
            else f"{sp['value']:.1f}×"
            + (
                f" [{sp['lo']:.1f}, {sp['hi']:.1f}]"
                if sp.get("lo") is not None and sp["lo"] != sp["hi"]
                else ""
            )
        )
        bw_s = (
            "–"
            if bw is None
            else f"{bw['value']:.0%}"
            + (
                f" [{bw['lo']:.0%}, {bw['hi']:.0%}]"
                if bw.get("lo") is not None and bw["lo"] != bw["hi"]
                else ""
            )
        )
        dense_s = f"{dense['median_ms']:.1f} ms" if dense else "–"
        lines.append(f"| {n} | {ours['median_ms']:.1f} ms | {dense_s} | {sp_s} | {bw_s} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("device", nargs="?", default="cpu")
    ap.add_argument("--quick", action="store_true", help="the quick-mode baselines")
    ap.add_argument("--dir", help="a run's folder instead of the committed baselines")
    ap.add_argument("--all", action="store_true", help="also the ratios without a target")
    a = ap.parse_args(argv)
    folder = Path(a.dir) if a.dir else H.baseline_dir(a.device, a.quick)
    docs = H.load_docs(folder, a.device)
    if not docs:
        sys.exit(f"no results for {a.device} in {folder}")
    print(f"Targets ({folder}):\n")
    print(ratios_table(docs, a.all))
    print(f"\nMeasured on:\n{provenance(docs)}")
    if "hadamard" in docs:
        print("\nHadamard transform per size:\n")
        print(hadamard_table(docs["hadamard"]))


if __name__ == "__main__":
    main()
