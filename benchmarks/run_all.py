"""Runs every family's benchmark on the present device (GPU if there is one, else CPU) and writes
JSON + CSV + PNG into --out. One script per family; this is the list."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import attention as bench_attention  # noqa: E402
from benchmarks import bench_hadamard  # noqa: E402
from benchmarks import chunkwise as bench_chunkwise  # noqa: E402
from benchmarks import cross_entropy as bench_cross_entropy  # noqa: E402
from benchmarks import quant as bench_quant  # noqa: E402
from benchmarks import s2ft as bench_s2ft  # noqa: E402
from benchmarks import sparse_delta as bench_sparse_delta  # noqa: E402
from benchmarks import harness as H  # noqa: E402

FAMILIES = {"hadamard": bench_hadamard.run, "quant": bench_quant.run, "sparse_delta": bench_sparse_delta.run,
            "s2ft": bench_s2ft.run, "attention": bench_attention.run,
            "cross_entropy": bench_cross_entropy.run, "chunkwise": bench_chunkwise.run}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    ap.add_argument("--only", nargs="*", default=list(FAMILIES))
    a = ap.parse_args()
    print(f"longtune benchmarks on {H.device_name(a.device)} -> {a.out}")
    for name in a.only:
        H.print_table(FAMILIES[name](a.device, a.out, a.quick))
