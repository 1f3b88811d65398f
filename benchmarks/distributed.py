"""Sequence parallelism (``longtune.distributed``) on CPU processes (gloo), W ranks each holding
N / W tokens:

1. bytes sent per rank per attention layer (forward + backward, the maximum over the ranks), one
   layer of B = 1, N tokens, H heads (MHA), head_dim D, float32, S^2 group G = N / 4: halo and
   Ulysses mode (S^2), ring mode (full causal attention), and an all-gather of K and V (forward)
   with a reduce-scatter of their gradients (backward), the baseline that needs no special
   exchange. Halo / Ulysses / ring are counted with ``count_comm`` at W = 2 and 4 and computed by
   formula at W = 2, 4 and 8 (the formulas are checked against the counts, byte for byte); the
   all-gather is a formula, 4 (W - 1) L H D bytes-per-element. Target: ring / halo >= 10 at W = 4.
2. saved-activation bytes per rank of a tiny patched Llama (2 layers, hidden 64, 4 heads, vocab
   128, N = 1024 tokens, S^2, fused cross-entropy head), the sum over the tensors autograd saves in
   the forward (``torch.autograd.graph.saved_tensors_hooks``, plus the tensors custom Functions
   keep as context attributes, found by walking the graph; each storage once, parameters not at
   all): the memory the backward keeps alive. Target: per rank <= 1.1 / W of one process on the
   whole sequence.
3. wall time of a training step of that model (forward, backward, gradient sum) at W = 1, 2, 4,
   the median over steps of the slowest rank's time (one thread per process; on a machine with
   fewer cores than W the ranks share cores, so this is not a scaling measurement there).

Not part of ``python -m benchmarks`` (it starts 7 processes; one to two minutes):
``python -m benchmarks.distributed [--quick] [--out DIR]``; writes distributed_cpu.json (+ PNG)."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks import harness as H  # noqa: E402

ELEM = 4  # float32


def halo_bytes(n, w, h, d, g, s2_mode="leakfree"):
    """Per rank: bytes halo mode sends in one layer's forward (K / V rows its successor needs) and
    backward (the gradients of the rows it received, back to its predecessor); MHA, so the
    unshifted and the shifted heads are H / 2 kv heads each."""
    from longtune.distributed import halo_rows

    uns, shf = halo_rows(n, w, g, s2_mode)
    per_row = 2 * (h // 2) * d * ELEM  # K and V of half the heads
    out = []
    for r in range(w):
        nxt = (r + 1) % w
        fwd = 0
        if nxt != 0 or s2_mode == "longlora_roll":
            fwd = (uns[nxt] if nxt else 0) + shf[nxt]
        bwd = uns[r] + shf[r]
        out.append((fwd + bwd) * per_row)
    return out


def ulysses_bytes(n, w, h, d):
    """Per rank: q, k, v to head shards and the output back (forward), the inverse in the
    backward: 8 all-to-alls of an (L, H, D) tensor, each sending (W - 1) / W of it."""
    return [8 * (w - 1) * (n // w) * (h // w) * d * ELEM] * w


def ring_bytes(n, w, h, d):
    """Per rank: K and V around the ring in W - 1 steps (forward); in the backward the blocks
    again (W - 1 steps) and their gradient accumulators (W steps, back to their owner)."""
    blk = (n // w) * h * d * ELEM
    return [(2 * (w - 1) + 2 * (w - 1) + 2 * w) * blk] * w


def allgather_bytes(n, w, h, d):
    """Per rank: an all-gather of K and V (forward) and a reduce-scatter of their gradients."""
    return [4 * (w - 1) * (n // w) * h * d * ELEM] * w


FORMULAS = {
    "halo": lambda n, w, h, d, g: halo_bytes(n, w, h, d, g),
    "ulysses": lambda n, w, h, d, g: ulysses_bytes(n, w, h, d),
    "ring": lambda n, w, h, d, g: ring_bytes(n, w, h, d),
    "all-gather": lambda n, w, h, d, g: allgather_bytes(n, w, h, d),
}


def _tiny_llama(n):
    from transformers import LlamaConfig, LlamaForCausalLM

    import longtune

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=n,
        attention_dropout=0.0,
    )
    m = LlamaForCausalLM(cfg).train()
    longtune.patch(m, attention="s2", lm_head="fused_ce")
    return m


def _ctx_tensors(obj, out):
    """The tensors inside ``obj`` (a custom Function's context attributes: tensors, or tuples,
    lists and dicts of them)."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _ctx_tensors(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _ctx_tensors(x, out)
    return out


def _saved_bytes(fn, params):
    """(bytes, fn's result): the bytes of the tensors the backward keeps alive after ``fn`` - those
    autograd saves (``saved_tensors_hooks``) and those custom Functions keep as context
    attributes (found by walking the graph; halo mode keeps its tensors so) - each storage once,
    parameters not counted."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def add(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()

    def pack(t):
        add(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    stack, visited = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        for t in _ctx_tensors(list(getattr(node, "__dict__", {}).values()), []):
            add(t)
        stack.extend(f for f, _ in node.next_functions)
    return sum(seen.values()), out


def _worker(rank, world, init_file, cfg, result_file):
    import longtune.distributed as sp

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    res = {"comm": {}, "saved": None, "step_ms": []}
    n, h, d = cfg["n"], cfg["h"], cfg["d"]
    g = n // 4
    # 1. bytes per attention layer
    if world > 1:
        for name, s2, mode in (
            ("halo", g, "halo"),
            ("ulysses", g, "ulysses"),
            ("ring", None, "ring"),
        ):
            x = torch.randn(1, n // world, h, d, requires_grad=True)
            with sp.count_comm() as stats:
                out = sp.s2_attention_sp(x, x, x, s2_group_size=s2, mode=mode)
                out.backward(torch.ones_like(out))
            res["comm"][name] = stats.total()
    # 2. saved activations and 3. step time of the tiny model
    m = _tiny_llama(cfg["model_n"])
    sp.patch_sequence_parallel(m)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (1, cfg["model_n"]), generator=gen)
    batch = sp.shard_batch(ids, ids)

    def forward():
        return m(input_ids=batch.input_ids, shift_labels=batch.labels).loss

    saved, loss = _saved_bytes(forward, list(m.parameters()))
    loss.backward()
    res["saved"] = saved
    for _ in range(cfg["steps"] + 1):
        m.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = time.perf_counter()
        forward().backward()
        sp.sum_gradients(m.parameters())
        ms = torch.tensor([(time.perf_counter() - t0) * 1e3])
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        res["step_ms"].append(float(ms))
    res["step_ms"] = res["step_ms"][1:]  # the first step warms up
    everything = [None] * world
    dist.all_gather_object(everything, res)
    if rank == 0:
        Path(result_file).write_text(json.dumps(everything))
    dist.destroy_process_group()


def _spawn(world, cfg):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(
            _worker,
            args=(world, os.path.join(tmp, "init"), cfg, out),
            nprocs=world,
            join=True,
        )
        return json.loads(Path(out).read_text())


def run(device: str = "cpu", out_dir: str | None = None, quick: bool = False) -> H.Report:
    if device != "cpu":
        print("benchmarks.distributed runs gloo processes on the CPU; --device is ignored")
    out_dir = out_dir or H.default_out_dir()
    report = H.Report("distributed", quick=quick)
    cfg = {"n": 256, "h": 8, "d": 16, "model_n": 512 if quick else 1024, "steps": 3 if quick else 5}
    n, h, d = cfg["n"], cfg["h"], cfg["d"]
    g = n // 4
    runs = {w: _spawn(w, cfg) for w in (1, 2, 4)}
    # 1. communication: counts at W = 2, 4 against the formulas, formulas for W = 8
    for w in (2, 4, 8):
        for mode, formula in FORMULAS.items():
            want = formula(n, w, h, d, g)
            counted = None
            if w in runs and mode != "all-gather":
                counted = [r["comm"][mode] for r in runs[w]]
                if counted != want:
                    raise AssertionError(
                        f"W={w} {mode}: counted bytes per rank {counted} != formula {want}"
                    )
            H.add_ratio(
                report,
                f"W={w} N={n} H={h} D={d} G={g} float32",
                f"{mode} bytes sent per rank per layer (max over ranks)",
                float(max(want)),
                method="counted (count_comm) = formula" if counted else "formula",
                per_rank=want,
            )
        ring, halo = max(ring_bytes(n, w, h, d)), max(halo_bytes(n, w, h, d, g))
        H.add_ratio(
            report,
            f"W={w} N={n} G=N/4",
            "ring bytes / halo bytes per rank",
            ring / halo,
            target=10.0 if w == 4 else None,
            method="formula, checked against count_comm at W=2, 4",
        )
    # 2. saved activations per rank vs one process
    full = runs[1][0]["saved"]
    for w in (2, 4):
        per_rank = max(r["saved"] for r in runs[w])
        H.add_ratio(
            report,
            f"tiny Llama N={cfg['model_n']} W={w}",
            "(1.1 / W) / (saved bytes per rank / saved bytes of one process)",
            (1.1 / w) / (per_rank / full),
            target=1.0,
            method="saved_tensors_hooks + custom Functions' context tensors, each storage once, "
            "parameters excluded",
            saved_bytes_per_rank=per_rank,
            saved_bytes_one_process=full,
        )
    # 3. step time
    for w, r in runs.items():
        t = r[0]["step_ms"]
        q = sorted(t)
        report.results.append(
            H.Result(
                f"tiny Llama N={cfg['model_n']} step",
                f"W={w}",
                {"world": w, "tokens_per_rank": cfg["model_n"] // w, "steps": len(t)},
                statistics.median(t),
                q[len(q) // 5],
                q[(4 * len(q)) // 5],
            )
        )
    try:
        import matplotlib  # noqa: F401

        plot = _plot
    except ImportError:
        plot = None
    H.write(report, out_dir, "cpu", plot)
    return report


def _plot(report, path, device_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    modes = list(FORMULAS)
    rows = [q for q in report.ratios if "bytes sent per rank" in q["metric"]]
    worlds = sorted({int(q["case"].split()[0][2:]) for q in rows})
    wd = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        ys = [
            next(
                q["value"]
                for q in rows
                if q["metric"].startswith(mode + " ") and q["case"].startswith(f"W={w} ")
            )  # fmt: skip
            for w in worlds
        ]
        a.bar([i + k * wd for i in range(len(worlds))], ys, width=wd, label=mode)
    a.set_xticks([i + 0.4 - wd / 2 for i in range(len(worlds))], [f"W={w}" for w in worlds])
    a.set_yscale("log")
    a.set_ylabel("bytes sent per rank per attention layer (fwd + bwd)")
    a.legend(fontsize=8)
    a.set_title("communication")
    b.bar([r.impl for r in report.results], [r.median_ms for r in report.results])
    b.set_ylabel("median step time, ms")
    b.set_title(report.results[0].case if report.results else "step")
    fig.suptitle(f"longtune.distributed - {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    H.cli(run)
