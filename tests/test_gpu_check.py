"""benchmarks/gpu_check.sh (make gpu-check) refuses bad arguments before doing anything; its dry
run on a machine without a GPU is CI's own step (.ci/run: make gpu-check DRY_RUN=1)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path, **env):
    full = dict(os.environ, GPU_RESULTS=str(tmp_path / "out"), **env)
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env=full,
    )


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"GPU_CHECK_STEPS": "tests bogus"},
            "unknown step 'bogus' in GPU_CHECK_STEPS "
            "(expected any of: build tests sanitizer bench)",
        ),
        ({"GPU_CHECK_DRY_RUN": "yes"}, "GPU_CHECK_DRY_RUN must be 0 or 1, got 'yes'"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, env, message):
    res = _run(tmp_path, **env)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()
