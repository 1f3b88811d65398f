"""Chunk-wise training (``longtune.train.seco_backward``) vs full backprop, side by side, on a tiny
Llama (4 layers, hidden 512, 8 heads, intermediate 1376, vocab 32000) built from a config in code
and patched with ``longtune.patch(model, attention="causal")``. One training step of a (1, N)
sequence:
 - full backprop with the model's own head: ``model(input_ids, labels=labels).loss.backward()`` (the
   N x vocabulary logits materialised, as in a plain Hugging Face training step);
 - full backprop with ``lm_head="fused_ce"`` (the loss from the hidden states through the fused
   linear + cross-entropy) - for scale;
SeCO and SpaCO run on the ``lm_head="fused_ce"``-patched model (their chunk losses go through the
fused op):
 - SeCO: ``seco_backward(model, input_ids, labels, chunk_size=N/16)`` (exact; 16 chunks);
 - SpaCO: ``seco_backward(..., budget=K, full_loss=False)`` with K = N/4 chunks of the 16 (K = 4;
   the 12 chunks not sampled skip the vocabulary head, the returned loss is the N/K estimate).
Every parameter's ``.grad`` is pre-allocated with zeros (the gradients are not charged to anyone).

Memory: ``harness.peak_memory`` over one step of each implementation (after a warm-up on a tiny
sequence): the peak of bytes allocated above the level at the step's start - the allocator's events
through the profiler on CPU, ``torch.cuda.max_memory_allocated`` on GPU - exact for a fixed shape.

Time: the four steps round-robin in the same process (``harness.timed_rounds``; ``LT_BENCH_ROUNDS``
rounds, default 5 - coverage 93.75%, the order rotated each round); the time ratios are medians of
the per-round ratios with their rank-based 95% interval. SpaCO draws a new sample of chunks every
step (its cost depends on the last sampled chunk); the samples timed are in the JSON and the ratio
of mean times is reported beside the paired one.

One subprocess does all of it (``_child``), so a run's memory high-water mark never leaks into the
next; on CPU a first subprocess measures full backprop alone, with a time limit, to pick the size.

Targets (N = 16k tokens, 16 chunks): SeCO peak memory <= 1/8 of full backprop's (full / SeCO
>= 8); SeCO time <= 1.5x full backprop (full time / SeCO time >= 1/1.5); SpaCO with K = N/4 >= 2.5x
faster than SeCO. The CPU run uses a shorter sequence when a full-backprop step takes too long (the
size used is in the case name and params). ``--quick``: 512 tokens, 2 layers, vocabulary 8000.

Run: ``python -m benchmarks.chunkwise [--device cpu|cuda] [--out DIR] [--quick]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
from benchmarks import harness as H  # noqa: E402

FULL = "full backprop"
FULL_FUSED = "full backprop, fused CE head"
SECO = "SeCO (16 chunks)"
SPACO = "SpaCO (K = N/4 chunks)"
IMPLS = {FULL: "full", FULL_FUSED: "full_fused", SECO: "seco", SPACO: "spaco"}
N_CHUNKS = 16
CONFIG = dict(
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    intermediate_size=1376,
    vocab_size=32000,
    max_position_embeddings=65536,
)
# --quick: 2 layers, vocabulary 8000 (SeCO's per-chunk cost includes O(vocab x hidden) gradient
# accumulation, which at a few hundred tokens would dominate)
QUICK_CONFIG = dict(CONFIG, num_hidden_layers=2, vocab_size=8000)


def _config() -> dict:
    """The model's config: QUICK_CONFIG in a child started for --quick (LT_CHUNKWISE_QUICK=1)."""
    return QUICK_CONFIG if os.environ.get("LT_CHUNKWISE_QUICK") == "1" else CONFIG


# the size tried first on CPU and the fallbacks when one full-backprop step takes longer than this
CPU_SIZES = (16384, 8192, 4096)
CPU_MAX_FULL_STEP_S = 120.0

_CHILD = """
import sys
from benchmarks.chunkwise import _child
_child(sys.argv[1].split(","), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
"""


def build_model(device: str, dtype=torch.float32, fused_head: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    import longtune  # noqa: F401 -- registers the ops

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_config())).to(device=device, dtype=dtype)
    longtune.patch(model, attention="causal", lm_head="fused_ce" if fused_head else None)
    model.train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def _step_fn(model, impl: str, n: int, device: str):
    from longtune.train import seco_backward
    from longtune.train.chunkwise import spaco_sample

    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, _config()["vocab_size"], (1, n), generator=g).to(device)
    labels = ids.clone()
    chunk = max(1, n // N_CHUNKS)
    if impl in ("full", "full_fused"):
        return lambda: model(input_ids=ids, labels=labels).loss.backward()
    if impl == "seco":
        return lambda: seco_backward(model, ids, labels, chunk_size=chunk)
    gen = torch.Generator().manual_seed(
        0
    )  # every step draws a new sample: timings average over them
    k = max(1, N_CHUNKS // 4)

    def spaco():
        spaco.samples.append(
            sorted(spaco_sample(N_CHUNKS, k, torch.Generator().set_state(gen.get_state())))
        )
        return seco_backward(
            model, ids, labels, chunk_size=chunk, budget=k, generator=gen, full_loss=False
        )

    spaco.samples = []
    return spaco


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _warm(model, device: str) -> None:
    for warm in ("full", "seco", "spaco"):  # tiny steps: thread pools, BLAS buffers, allocator
        _step_fn(model, warm, 4 * N_CHUNKS, device)()
    _sync(device)


def _child(mem_impls: list, device: str, n: int, rounds: int) -> None:
    """In a fresh process: build the models (own head, fused CE head), warm every path up on a tiny
    sequence, measure the peak memory of one full-size step of each implementation in ``mem_impls``
    (keys of IMPLS' values; its duration reported as ``first_s``), then, when ``rounds`` > 0, time
    the four steps round-robin for ``rounds`` rounds (order rotated each round). Prints one JSON
    line."""
    import time

    models = {"full": build_model(device, fused_head=False), "fused": build_model(device)}
    for m in models.values():
        _warm(m, device)
    steps = {
        i: _step_fn(models["full" if i == "full" else "fused"], i, n, device)
        for i in IMPLS.values()
    }
    out = {"memory": {}}
    for impl in filter(None, mem_impls):
        if device == "cuda":
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        m = H.peak_memory(steps[impl], device)
        out["memory"][impl] = dict(m, first_s=time.perf_counter() - t0)
    if rounds > 0:
        steps["spaco"].samples.clear()
        got = H.timed_rounds(
            "chunkwise",
            [(name, steps[i]) for name, i in IMPLS.items()],
            device,
            rounds,
            warmup=False,
        )  # warmed up above; a full-size warm-up step would cost minutes
        out["times_ms"] = {name: g["ms"] for name, g in got.items()}
        out["spaco_samples"] = steps["spaco"].samples
    print(json.dumps(out))


def _run_child(
    mem_impls: list,
    device: str,
    n: int,
    rounds: int = 0,
    timeout_s: float | None = None,
    quick: bool = False,
) -> dict:
    """Runs :func:`_child` in a fresh process; raises subprocess.TimeoutExpired past timeout_s."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, ",".join(mem_impls) or ",", device, str(n), str(rounds)],
        capture_output=True,
        text=True,
        env=dict(os.environ, TQDM_DISABLE="1", LT_CHUNKWISE_QUICK="1" if quick else "0"),
        timeout=timeout_s,
        cwd=str(ROOT),
    )  # `python -c` imports from its working directory: the benchmarks package
    if out.returncode != 0:
        raise RuntimeError(f"{mem_impls} at N={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(report, path, device_name):
    """Two panels: step time and peak memory per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = report.results
    colours = [plt.cm.tab10(i % 10) for i in range(len(rs))]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 0.5 * len(rs) + 2))
    y = list(range(len(rs)))[::-1]
    a1.barh(y, [r.median_ms / 1e3 for r in rs], color=colours)
    a1.set_yticks(y)
    a1.set_yticklabels([f"{r.case}\n{r.impl}" for r in rs], fontsize=7)
    a1.set_xlabel("training step time, s")
    mem = [r.params.get("peak_memory_bytes", 0) / 2**20 for r in rs]
    a2.barh(y, mem, color=colours)
    a2.set_yticks(y)
    a2.set_yticklabels([])
    a2.set_xlabel("peak memory of the step, MiB")
    for yi, r, m in zip(y, rs, mem):
        a1.text(r.median_ms / 1e3, yi, f" {r.median_ms / 1e3:.3g}", va="center", fontsize=7)
        a2.text(m, yi, f" {m:.4g}", va="center", fontsize=7)
    fig.suptitle(f"chunk-wise training (SeCO / SpaCO) - {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(device: str, out_dir: str, quick: bool = False) -> H.Report:
    report = H.Report("chunkwise", quick=quick)
    cuda = device == "cuda"
    rounds = H.rounds(5)
    sizes = (512,) if quick else ((16384,) if cuda else CPU_SIZES)
    if os.environ.get("LT_CHUNKWISE_N"):  # one size, no time limit
        sizes = (int(os.environ["LT_CHUNKWISE_N"]),)
    mem = {}
    n = sizes[0]
    if len(sizes) > 1:  # CPU: the longest sequence whose full-backprop step fits the time limit
        for i, n in enumerate(sizes):
            print(f"[chunkwise] N={n}: memory of {FULL} ...", file=sys.stderr, flush=True)
            last = i == len(sizes) - 1
            try:
                # model build + warm-up take a few seconds; past that the step itself is too slow
                mem = _run_child(
                    ["full"], device, n, 0, None if last else 2 * CPU_MAX_FULL_STEP_S + 30
                )["memory"]
            except subprocess.TimeoutExpired:
                mem = {}
            if last or (mem and mem["full"]["first_s"] <= CPU_MAX_FULL_STEP_S):
                break
            print(
                f"[chunkwise] N={n}: one full-backprop step takes > {CPU_MAX_FULL_STEP_S:.0f} s on "
                "this machine, trying a shorter sequence",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"[chunkwise] N={n}: memory of every step, then {rounds} interleaved rounds ...",
        file=sys.stderr,
        flush=True,
    )
    got = _run_child([i for i in IMPLS.values() if i not in mem], device, n, rounds, quick=quick)
    mem.update(got["memory"])
    mem = {name: mem[impl] for name, impl in IMPLS.items()}
    times = got["times_ms"]

    chunk = max(1, n // N_CHUNKS)
    cfg = QUICK_CONFIG if quick else CONFIG
    case = f"tiny Llama N={n} chunks={N_CHUNKS}" + (" (2 layers, V=8000)" if quick else "")
    params = dict(
        cfg,
        tokens=n,
        chunk_size=chunk,
        n_chunks=N_CHUNKS,
        spaco_budget=N_CHUNKS // 4,
        dtype="float32",
        attention="longtune causal",
        seco_lm_head="fused_ce",
        spaco_full_loss=False,
        timing=(
            f"{rounds} rounds, the four steps round-robin in one process, order rotated per round"
        ),
        spaco_samples_timed=got["spaco_samples"],
    )
    if not quick and not cuda and n != CPU_SIZES[0]:
        params["note"] = (
            f"target size is N={CPU_SIZES[0]}; one CPU full-backprop step at the larger sizes took "
            f"> {CPU_MAX_FULL_STEP_S:.0f} s"
        )
    # forward of the linear layers 2 * params_nonembed * tokens; backward twice that (attention not
    # counted)
    lin = cfg["num_hidden_layers"] * (
        4 * cfg["hidden_size"] ** 2 + 3 * cfg["hidden_size"] * cfg["intermediate_size"]
    )
    lin += cfg["vocab_size"] * cfg["hidden_size"]
    flops = 6 * lin * n
    for name, m in mem.items():
        med, p20, p80 = H._quantiles(times[name])
        report.results.append(
            H.Result(
                case,
                name,
                dict(
                    params,
                    peak_memory_bytes=m["bytes"],
                    peak_memory_method=m["method"],
                    memory_step_ms=m["first_s"] * 1e3,
                    step_times_ms=times[name],
                ),
                med,
                p20,
                p80,
                flops,
                0,
                tflops=flops / (med * 1e-3) / 1e12,
            )
        )
        print(
            f"[chunkwise] {case} / {name}: peak memory of the step {m['bytes'] / 2**20:.1f} MiB, "
            f"step {med / 1e3:.2f} s (median of {len(times[name])})",
            file=sys.stderr,
        )
    mean = {name: sum(t) / len(t) for name, t in times.items()}
    tg = not quick  # the targets are for 16k tokens; --quick (512) reports the ratios without them
    H.add_memory_ratio(
        report, case, "full / SeCO peak memory", mem[FULL], mem[SECO], 8.0 if tg else None
    )
    H.add_memory_ratio(report, case, "full / SpaCO peak memory", mem[FULL], mem[SPACO])
    H.add_memory_ratio(
        report, case, "full (fused CE head) / SeCO peak memory", mem[FULL_FUSED], mem[SECO]
    )
    # time ratios: median over rounds of the per-round ratio (the machine's speed drifts between
    # rounds); SpaCO draws a new sample every step, so its mean over the rounds is reported too
    H.add_speed_ratio(
        report, case, "full time / SeCO time", times, FULL, SECO, round(1 / 1.5, 4) if tg else None
    )
    H.add_speed_ratio(
        report, case, "SeCO time / SpaCO time", times, SECO, SPACO, 2.5 if tg else None
    )
    H.add_ratio(
        report,
        case,
        "SeCO mean time / SpaCO mean time (samples averaged)",
        mean[SECO] / mean[SPACO],
    )
    H.add_speed_ratio(
        report, case, "full (fused CE head) time / SeCO time", times, FULL_FUSED, SECO
    )
    H.write(report, out_dir, device, plot)
    return report


if __name__ == "__main__":
    H.cli(run)
