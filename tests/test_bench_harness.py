"""The benchmark harness as an instrument: memory by accounting (exact, repeatable, never zero for
a step that allocates), ratio intervals and verdicts, the slowdown test hook, and the regression
gate's logic on synthetic runs. Fast: no real benchmark runs here."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from benchmarks import harness as H  # noqa: E402  (the repository root is on the path under pytest)
from benchmarks import run_all  # noqa: E402

import longtune


# ----------------------------------------------------------------------------- memory
def _ce_inputs(t, d, v):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).requires_grad_()
    tgt = torch.randint(0, v, (t,), generator=g)
    x.grad, w.grad = torch.zeros_like(x), torch.zeros_like(w)
    return x, w, tgt


def test_fused_ce_peak_memory_is_an_eighth_of_naive_exact_and_repeatable():
    # T well above the fused op's row block (2^23 / V = 1024 -> 512 rows at V = 8192): at T <= 512
    # the block is the whole T x V logits and the fused op saves only the naive path's extra copies
    x, w, tgt = _ce_inputs(4096, 64, 8192)

    def fused():
        longtune.linear_cross_entropy(x, w, tgt).backward()

    def naive():
        F.cross_entropy(x @ w.T, tgt).backward()

    fused(), naive()  # warm-up
    f1, n1 = H.peak_memory(fused, "cpu"), H.peak_memory(naive, "cpu")
    f2, n2 = H.peak_memory(fused, "cpu"), H.peak_memory(naive, "cpu")
    assert f1 == f2 and n1 == n2, (f1, f2, n1, n2)  # deterministic to the byte
    assert f1["bytes"] > 0 and n1["bytes"] > 0
    assert (
        n1["bytes"] >= 3 * 4096 * 8192 * 4
    )  # logits, their softmax and their gradient: T x V floats each
    assert f1["bytes"] * 8 <= n1["bytes"], (f1["bytes"], n1["bytes"])
    assert "profiler" in f1["method"]


def test_peak_memory_counts_what_a_step_allocates_and_nothing_else():
    keep = []
    assert H.peak_memory(lambda: None, "cpu")["bytes"] == 0
    assert (
        H.peak_memory(lambda: keep.append(torch.empty(1000, dtype=torch.float32)), "cpu")["bytes"]
        == 4000
    )

    def transient():
        a = torch.empty(2**20, dtype=torch.uint8)
        b = torch.empty(2**19, dtype=torch.uint8)
        del a, b

    assert H.peak_memory(transient, "cpu")["bytes"] == 2**20 + 2**19
    big = torch.empty(
        2**22, dtype=torch.uint8
    )  # existing before the step, freed in it: not a negative peak
    assert H.peak_memory(lambda: keep.append(big.clone()), "cpu")["bytes"] == 2**22


def test_memory_ratio_is_exact_and_refuses_a_zero_denominator():
    rep = H.Report("x")
    q = H.add_memory_ratio(
        rep, "c", "m", {"bytes": 800, "method": "a"}, {"bytes": 100, "method": "a"}, 8.0
    )
    assert (
        q["value"] == q["lo"] == q["hi"] == 8.0 and q["verdict"] == "met" and q["kind"] == "memory"
    )
    with pytest.raises(ValueError, match="allocated nothing"):
        H.add_memory_ratio(
            rep, "c", "m", {"bytes": 800, "method": "a"}, {"bytes": 0, "method": "a"}
        )


# --------------------------------------------------------------------------- intervals and verdicts
def test_median_interval_order_statistics():
    med, lo, hi, cov = H.median_interval(list(range(1, 16)))  # n = 15: [x_4, x_12], 96.5%
    assert (med, lo, hi) == (8, 4, 12) and cov == pytest.approx(0.96484375)
    med, lo, hi, cov = H.median_interval(
        [5, 1, 3, 2, 4]
    )  # n = 5: 95% is out of reach -> [min, max]
    assert (med, lo, hi) == (3, 1, 5) and cov == pytest.approx(0.9375)


@pytest.mark.parametrize(
    "ratios,target,expected",
    [
        ([1.6, 1.7, 1.65, 1.62, 1.7, 1.61, 1.68], 1.5, "met"),
        ([1.3, 1.35, 1.32, 1.31, 1.4, 1.33, 1.38], 1.5, "not met"),
        ([1.3, 1.7, 1.5, 1.45, 1.6, 1.35, 1.55], 1.5, "undecided"),
        ([1.3, 1.7, 1.5], None, None),
    ],
)
def test_speed_ratio_verdicts(ratios, target, expected):
    rep = H.Report("x")
    times = {"peer": [r * 10 for r in ratios], "ours": [10.0] * len(ratios)}
    q = H.add_speed_ratio(rep, "c", "peer / ours", times, "peer", "ours", target)
    assert (
        q["verdict"] == expected and q["lo"] <= q["value"] <= q["hi"] and q["rounds"] == len(ratios)
    )
    assert H.add_speed_ratio(rep, "c", "m", times, "absent", "ours", 1.0) is None  # a skipped peer


def test_interleaved_rounds_and_injected_slowdown(monkeypatch):
    monkeypatch.setenv("LT_BENCH_INJECT_SLOWDOWN", "fam:slow*:2.0;other:ours:9")
    assert (
        H.injected_slowdown("fam", "slow impl") == 2.0 and H.injected_slowdown("fam", "ours") == 1.0
    )
    order = []
    got = H.timed_rounds(
        "fam",
        [("a", lambda: order.append("a")), ("slow impl", lambda: order.append("s"))],
        "cpu",
        4,
        warmup=False,
    )
    assert order == ["a", "s", "s", "a", "a", "s", "s", "a"]  # one of each per round, order rotated
    assert all(len(g["ms"]) == 4 for g in got.values())

    def broken():
        raise RuntimeError("peer not installed")

    got = H.timed_rounds("fam", [("ok", lambda: None), ("broken", broken)], "cpu", 2)
    assert list(got) == ["ok"]  # a failing peer is left out, the others still measured


# ----------------------------------------------------------------------------- the gate
def _doc(family, ratios, mode="quick"):
    return {
        "benchmark": family,
        "schema": 2,
        "device_kind": "cpu",
        "mode": mode,
        "results": [],
        "ratios": ratios,
    }


def _q(metric, value, lo, hi, kind="time", method="m"):
    return {
        "case": "c",
        "metric": metric,
        "kind": kind,
        "value": value,
        "lo": lo,
        "hi": hi,
        "method": method,
        "target": None,
        "verdict": None,
    }


def test_gate_compares_ratios_not_times():
    base = {
        "attention": _doc(
            "attention",
            [
                _q("LongLoRA / ours", 1.55, 1.48, 1.62),
                _q("bool / ours", 8.0, 7.5, 8.4),
                _q("mem", 10.0, 10.0, 10.0, "memory"),
                _q("gone", 2.0, 1.9, 2.1),
            ],
        )
    }
    run = {
        "attention": _doc(
            "attention",
            [
                _q(
                    "LongLoRA / ours", 1.25, 1.20, 1.31
                ),  # a 20% slowdown of ours: the whole interval below 1.48 x 0.9
                _q("bool / ours", 7.9, 7.2, 8.6),  # noise: the interval still covers the baseline
                _q("mem", 10.0, 10.0, 10.0, "memory"),
                _q("new one", 3.0, 2.9, 3.1),
            ],
        )
    }
    rows = {r["metric"]: r for r in H.compare(run, base)}
    assert rows["LongLoRA / ours"]["status"] == "REGRESSION"
    assert rows["bool / ours"]["status"] == "ok" and rows["mem"]["status"] == "ok"
    assert rows["gone"]["status"] == "missing" and rows["new one"]["status"] == "new"
    assert H.gate_failed(list(rows.values()))
    table = H.gate_table(list(rows.values()))
    assert "REGRESSION" in table.splitlines()[1] and "FAIL" in table.splitlines()[-1]
    # within the tolerance: [1.34, 1.40] vs the baseline's [1.48, 1.62]: not below 1.48 x 0.9 =
    # 1.332
    run["attention"]["ratios"][0] = _q("LongLoRA / ours", 1.37, 1.34, 1.40)
    assert not H.gate_failed(H.compare(run, base))
    assert H.gate_failed(H.compare(run, base, tol_time=0.05))  # 1.40 < 1.48 x 0.95
    # a schema-1 baseline (a point, no interval) is compared as the point
    base["attention"]["ratios"][0] = {
        "case": "c",
        "metric": "LongLoRA / ours",
        "value": 1.6,
        "target": 1.5,
        "met": True,
    }
    assert H.gate_failed(H.compare(run, base))  # 1.40 < 1.6 x 0.9
    base["attention"]["ratios"][0] = _q("LongLoRA / ours", 1.55, 1.48, 1.62)
    # memory: exact figures, 1% tolerance; a counting method change is reported, not judged
    run["attention"]["ratios"][2] = _q("mem", 9.0, 9.0, 9.0, "memory")
    assert H.gate_failed(H.compare(run, base))
    run["attention"]["ratios"][2] = _q("mem", 9.0, 9.0, 9.0, "memory", method="other")
    assert {r["metric"]: r["status"] for r in H.compare(run, base)}["mem"] == "method changed"


def test_gate_command_exit_codes(tmp_path, capsys):
    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    base_dir.mkdir(), run_dir.mkdir()
    (base_dir / "s2ft_cpu.json").write_text(
        json.dumps(_doc("s2ft", [_q("full / S2FT", 3.0, 2.9, 3.1)]))
    )
    (run_dir / "s2ft_cpu.json").write_text(
        json.dumps(_doc("s2ft", [_q("full / S2FT", 2.95, 2.85, 3.05)]))
    )
    args = ["--device", "cpu", "--compare", str(run_dir), "--baseline", str(base_dir)]
    assert run_all.main(args) == 0
    (run_dir / "s2ft_cpu.json").write_text(
        json.dumps(_doc("s2ft", [_q("full / S2FT", 2.4, 2.3, 2.5)]))
    )
    assert run_all.main(args) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "-> FAIL" in out and (run_dir / "gate.txt").exists()
    assert (
        run_all.main(
            ["--device", "cpu", "--compare", str(run_dir), "--baseline", str(tmp_path / "none")]
        )
        == 2
    )


def test_committed_baselines_carry_their_provenance():
    docs = H.load_docs(H.baseline_dir("cpu", False), "cpu")
    assert {
        "attention",
        "cross_entropy",
        "chunkwise",
        "s2ft",
        "sparse_delta",
        "quant",
        "hadamard",
    } <= set(docs)
    for doc in docs.values():
        assert doc["device"] and doc["torch"] and doc["longtune_commit"] and doc["timestamp"]
