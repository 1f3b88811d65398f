"""The benchmark suite's entry points: ``python -m longtune.bench`` from outside the source tree
(the checkout's ``benchmarks`` package found next to the imported longtune) and ``python -m
benchmarks`` from the repository root; both parse the suite's options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import longtune

ROOT = Path(__file__).resolve().parent.parent


def _run(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(Path(longtune.__file__).resolve().parent.parent))
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


def test_longtune_bench_runs_from_outside_the_tree(tmp_path):
    res = _run(["-m", "longtune.bench", "--help"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--only" in res.stdout and "--quick" in res.stdout


def test_benchmarks_package_runs_from_the_repository_root():
    res = _run(["-m", "benchmarks", "--help"], ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--update-baseline" in res.stdout
