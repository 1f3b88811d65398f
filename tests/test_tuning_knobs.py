"""The CPU kernels' tuning knobs (docs/tuning.md): LT_ATTN_TILES and LT_LCE_ROWS change the block
sizes only (same results up to summation order); an invalid value is reported on stderr and the
default is kept (bit-identical results)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PKG_ROOT = Path(__file__).resolve().parent.parent / "python"

SCRIPT = r"""
import json, torch, longtune
g = torch.Generator().manual_seed(0)
q, k, v, do = (torch.randn(2, 300, 3, 64, dtype=torch.float64, generator=g) for _ in range(4))
for t in (q, k, v):
    t.requires_grad_(True)
o = longtune.sparse_attention(q, k, v, causal=True, s2_group_size=64)
o.backward(do)
x = torch.randn(70, 16, dtype=torch.float64, generator=g, requires_grad=True)
w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
t = torch.randint(0, 50, (70,), generator=g)
loss = longtune.linear_cross_entropy(x, w, t)
loss.backward()
print(json.dumps([o.tolist(), q.grad.tolist(), k.grad.tolist(), loss.item(), x.grad.tolist(),
                  w.grad.tolist()]))
"""


def _run(**env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("LT_ATTN_TILES", "LT_LCE_ROWS")}
    env.update(env_vars)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PKG_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return [
        torch.tensor(a, dtype=torch.float64)
        for a in json.loads(out.stdout.strip().splitlines()[-1])
    ], out.stderr


@pytest.fixture(scope="module")
def default():
    values, err = _run()
    assert "longtune: ignoring" not in err
    return values


@pytest.mark.parametrize(
    "env",
    [
        {"LT_ATTN_TILES": "1,64", "LT_LCE_ROWS": "1"},
        {"LT_ATTN_TILES": " 128 , 512 ", "LT_LCE_ROWS": "7"},
        {"LT_ATTN_TILES": "48,100", "LT_LCE_ROWS": "65536"},
    ],
)
def test_valid_values_change_blocking_only(default, env):
    values, err = _run(**env)
    assert "longtune: ignoring" not in err
    for a, b in zip(values, default):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "name,value",
    [
        ("LT_ATTN_TILES", "32"),
        ("LT_ATTN_TILES", "64,32"),
        ("LT_ATTN_TILES", "0,256"),
        ("LT_ATTN_TILES", "64,256x"),
        ("LT_ATTN_TILES", "abc"),
        ("LT_ATTN_TILES", ""),
        ("LT_LCE_ROWS", "0"),
        ("LT_LCE_ROWS", "-3"),
        ("LT_LCE_ROWS", "12rows"),
        ("LT_LCE_ROWS", "100000"),
    ],
)
def test_invalid_values_are_reported_and_ignored(default, name, value):
    values, err = _run(**{name: value})
    assert f'longtune: ignoring {name}="{value}"' in err, err
    assert "docs/tuning.md" in err
    for a, b in zip(values, default):
        assert torch.equal(a, b)
