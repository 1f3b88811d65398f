"""Fast Walsh-Hadamard transform: longtune vs its peers, side by side in one run.

CPU: dense `x @ H` (torch, the same dtype) and a `torch.clone` of the input (the bandwidth
ceiling: one read + one write, like the transform).
GPU: the `fast-hadamard-transform` package when importable, dense `x @ H` (cuBLAS) and
`torch.clone`.
Targets: CPU >= 3x dense at n >= 1024 and >= 50% of clone bandwidth at n = 4096;
GPU >= 1.2x fast-hadamard-transform and >= 85% of clone bandwidth in bf16, n = 128..32768.
"""

from __future__ import annotations

import math

import torch

import longtune  # noqa: E402
from benchmarks import harness as H  # noqa: E402
from longtune.ops.hadamard import hadamard_flops  # noqa: E402


def _peer_fht():
    try:
        import fast_hadamard_transform as fht  # noqa: F401

        return fht.hadamard_transform
    except Exception:
        return None


def cases(device: str, quick: bool):
    if device == "cuda":
        dtype, total = torch.bfloat16, 1 << 26
        sizes = [2**k for k in range(7, 16)] + [12 * 1024, 28 * 1024, 76 * 64, 148 * 128]
    else:
        dtype, total = torch.float32, (1 << 21) if quick else (1 << 23)
        sizes = [256, 1024, 4096, 16384, 76 * 64, 148 * 128] if not quick else [1024, 4096, 76 * 64]
    for n in sizes:
        yield n, max(1, total // n), dtype


def plot(report, path, device_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    impls = sorted({r.impl for r in report.results})
    for impl in impls:
        pts = [
            (r.params["n"], r.gbps) for r in report.results if r.impl == impl and r.params["pow2"]
        ]
        if pts:
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n (power-of-two sizes)")
    ax.set_ylabel("effective bandwidth, GB/s (read + write)")
    ax.set_title(f"Hadamard transform - {device_name}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(device: str, out_dir: str, quick: bool = False) -> H.Report:
    report = H.Report("hadamard", quick=quick)
    peer = _peer_fht() if device == "cuda" else None
    n_rounds = H.rounds(9 if quick else 15)
    for n, rows, dtype in H.progress(list(cases(device, quick)), "hadamard"):
        x = torch.randn(rows, n, device=device, dtype=dtype)
        case = f"n={n} rows={rows}"
        params = {
            "n": n,
            "rows": rows,
            "dtype": str(dtype).replace("torch.", ""),
            "pow2": n & (n - 1) == 0,
        }
        nbytes = 2 * x.numel() * x.element_size()
        flops = hadamard_flops(x.shape)
        scale = 1 / math.sqrt(n)
        impls = [
            ("longtune", lambda x=x, scale=scale: longtune.hadamard_transform(x, scale)),
            ("torch.clone", lambda x=x: x.clone()),
        ]
        fl = {"longtune": flops, "fast-hadamard-transform": flops}
        if n <= 16384:
            Hm = longtune.hadamard_matrix(n, dtype=dtype, device=device)
            impls.append(("torch dense x @ H", lambda x=x, Hm=Hm, scale=scale: (x @ Hm) * scale))
            fl["torch dense x @ H"] = 2 * rows * n * n
        if peer is not None and params["pow2"]:
            impls.append(("fast-hadamard-transform", lambda x=x, scale=scale: peer(x, scale)))
        t = H.measure_interleaved(
            report,
            case,
            impls,
            device,
            params,
            rounds=n_rounds,
            flops=fl,
            nbytes={name: nbytes for name, _ in impls},
        )
        H.add_speed_ratio(
            report,
            case,
            "fraction of torch.clone bandwidth",
            t,
            "torch.clone",
            "longtune",
            (0.85 if device == "cuda" else (0.5 if n == 4096 else None)),
        )
        H.add_speed_ratio(
            report,
            case,
            "speedup vs dense x @ H",
            t,
            "torch dense x @ H",
            "longtune",
            3.0 if (device == "cpu" and n >= 1024) else None,
        )
        H.add_speed_ratio(
            report,
            case,
            "speedup vs fast-hadamard-transform",
            t,
            "fast-hadamard-transform",
            "longtune",
            1.2,
        )
        impls = Hm = None
    H.write(report, out_dir, device, plot)
    return report


if __name__ == "__main__":
    H.cli(run)
