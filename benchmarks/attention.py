"""Block-sparse attention (``longtune.sparse_attention``), side by side in one run, layout (B, N, H,
D).

S^2-Attn (LongLoRA's shifted sparse attention, G = N/4, causal), forward + backward (the timed
function runs the forward and ``torch.autograd.grad`` of a fixed random output gradient w.r.t. q, k,
v) and forward only (under ``torch.no_grad``):
 - longtune S^2 (``s2_mode="leakfree"``);
 - LongLoRA's formulation as its users run it (``longtune.reference.attention.longlora_s2_sdpa``:
   roll half the heads, reshape into groups, causal SDPA per group, roll back -- with its copies);
 - CPU: SDPA with an explicit boolean mask (the dense S^2 mask of every head, (1, H, N, N));
 - GPU: FlexAttention with the same mask_mod (``torch.compile``d ``flex_attention`` +
   ``create_block_mask``), skipped with a message when unavailable;
 - dense causal SDPA (``is_causal=True``; on GPU forced to the flash backend) as a reference point.
SQA scaling: causal attention of H=8 heads (MHA: H_q = H_kv = 8) vs SQA (4, 2), sSQA (4, 4),
xSQA (2, 2), xSMQA (2, 1) -- ``longtune.sparse_attention`` on q with H_q heads and k/v with H_kv
heads, which is what ``longtune.nn.SparseQueryAttention`` runs -- forward + backward.

FLOPs count unmasked (query, key) pairs only (``longtune.ops.attention.count_pairs``): forward
4 * pairs * d, forward + backward 14 * pairs * d. Every implementation of an S^2 case is credited
with the S^2 pairs (so its TFLOP/s is "effective": useful work per second); dense causal SDPA with
the causal pairs.

Targets. CPU (fp32, B=1, H=8, N=4096, d=64): LongLoRA time / ours >= 1.5, SDPA bool-mask
time / ours >= 6 (fwd + bwd); SQA scaling: (t_MHA / t_variant) / (H / H_q) >= 0.9.
GPU (bf16, B=1, H=8, d=128, N = 8k..32k (64k)): LongLoRA / ours >= 1.5, Flex / ours >= 1.3, ours
TFLOP/s / dense flash TFLOP/s >= 1.0; SQA variants at 32k (and 64k) >= 0.9 of H / H_q.

Run: ``python -m benchmarks.attention [--device cpu|cuda] [--out DIR] [--quick]``.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import longtune  # noqa: E402
from benchmarks import harness as H  # noqa: E402
from longtune.ops.attention import count_pairs  # noqa: E402
from longtune.reference.attention import attention_mask, longlora_s2_sdpa  # noqa: E402

OURS = "longtune S2 (leakfree)"
LONGLORA = "LongLoRA S2 (roll+SDPA)"
BOOL = "SDPA bool mask"
FLEX = "FlexAttention (compiled)"
DENSE = "SDPA dense causal"
FLASH = "flash SDPA dense causal"
# (name, H_q, H_kv) of the SQA family, MHA first (the baseline)
SQA_VARIANTS = [("MHA", 8, 8), ("SQA", 4, 2), ("sSQA", 4, 4), ("xSQA", 2, 2), ("xSMQA", 2, 1)]


def plot(report, path, device_name):
    """One horizontal bar per (case, impl): median time (log scale), colour = implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = report.results
    impls = list(dict.fromkeys(r.impl for r in rs))
    colours = {impl: plt.cm.tab10(i % 10) for i, impl in enumerate(impls)}
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rs) + 1.5))
    y = list(range(len(rs)))[::-1]
    ax.barh(y, [r.median_ms for r in rs], color=[colours[r.impl] for r in rs])
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r.case} | {r.impl}" for r in rs], fontsize=7)
    for yi, r in zip(y, rs):
        txt = f" {r.median_ms:.3g} ms" + (f", {r.tflops:.3g} TFLOP/s" if r.tflops else "")
        ax.text(r.median_ms, yi, txt, va="center", fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("median time, ms (log scale); TFLOP/s on unmasked pairs")
    ax.set_title(f"sparse attention - {device_name}")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fwd_bwd(f, inputs, go):
    """A timed function: forward, then the gradients of <out, go> w.r.t. the inputs."""

    def fn():
        torch.autograd.grad(f(), inputs, go)

    return fn


def _fwd(f):
    def fn():
        with torch.no_grad():
            f()

    return fn


def _flex_s2(n, h, g, device):
    """(compiled flex_attention, BlockMask) for S^2 leakfree on (B, H, N, D) tensors, or raises."""
    # a fresh compile per N: the closures below differ per call, and piling recompiles up to
    # dynamo's limit would silently fall back to eager flex_attention (dense scores)
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()
    half, s = h // 2, g // 2

    def mask_mod(b, hh, q_idx, kv_idx):
        shift = (hh >= half).to(q_idx.dtype) * s  # the second half of the heads is shifted by G/2
        return (kv_idx <= q_idx) & ((q_idx + shift) // g == (kv_idx + shift) // g)

    bm = create_block_mask(mask_mod, B=None, H=h, Q_LEN=n, KV_LEN=n, device=device, _compile=True)
    return torch.compile(flex_attention, dynamic=False), bm


def s2_cases(report, device, n, h, d, dtype, n_rounds, peers_bool, targets=True):
    b, g = 1, n // 4
    gen = torch.Generator(device=device).manual_seed(n)

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    q, k, v = (rnd(b, n, h, d).requires_grad_() for _ in range(3))
    go = rnd(b, n, h, d)
    # the peers that take (B, H, N, D) get their own contiguous leaves: no layout cost is charged to
    # them
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    got = go.transpose(1, 2).contiguous()
    pairs = count_pairs(n, n, h, causal=True, s2_group_size=g)
    pairs_causal = count_pairs(n, n, h, causal=True)
    params = {
        "B": b,
        "N": n,
        "H": h,
        "d": d,
        "G": g,
        "dtype": str(dtype).replace("torch.", ""),
        "pairs": pairs,
        "pairs_dense_causal": pairs_causal,
    }
    impls = [
        (
            OURS,
            lambda: longtune.sparse_attention(q, k, v, causal=True, s2_group_size=g),
            (q, k, v),
            go,
            pairs,
        ),
        (LONGLORA, lambda: longlora_s2_sdpa(q, k, v, g), (q, k, v), go, pairs),
    ]
    if peers_bool:
        mask = torch.stack(
            [
                attention_mask(
                    n, n, shifted=e >= h // 2, causal=True, s2_group_size=g, device=device
                )
                for e in range(h)
            ]
        ).unsqueeze(0)  # (1, H, N, N)
        impls.append(
            (
                BOOL,
                lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask),
                (qt, kt, vt),
                got,
                pairs,
            )
        )
    if device == "cuda":
        try:
            flex, bm = _flex_s2(n, h, g, device)
            impls.append((FLEX, lambda: flex(qt, kt, vt, block_mask=bm), (qt, kt, vt), got, pairs))
        except Exception as e:  # noqa: BLE001
            print(
                f"[attention] FlexAttention unavailable: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}",
                file=sys.stderr,
            )
        impls.append(
            (
                FLASH,
                lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
                (qt, kt, vt),
                got,
                pairs_causal,
            )
        )
    else:
        impls.append(
            (
                DENSE,
                lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
                (qt, kt, vt),
                got,
                pairs_causal,
            )
        )

    def flash(fn):
        def wrapped():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return fn()

        return wrapped

    for mode in ("fwd+bwd", "fwd"):
        case = f"S2 N={n} G={g} H={h} d={d} {mode}"
        fb = mode == "fwd+bwd"
        fns = [
            (name, *((_fwd_bwd(f, inputs, grad), 14 * p * d) if fb else (_fwd(f), 4 * p * d)))
            for name, f, inputs, grad, p in impls
        ]
        fns = [(name, flash(fn) if name == FLASH else fn, fl) for name, fn, fl in fns]
        # round-robin, compared round by round: a shared machine drifts by +-20% over the seconds
        # that timing one implementation after the other would take
        times = H.measure_interleaved(
            report,
            case,
            [(nm, fn) for nm, fn, _ in fns],
            device,
            params,
            rounds=n_rounds,
            flops={nm: fl for nm, _, fl in fns},
        )
        cpu_tgt = targets and fb and device == "cpu"
        gpu_tgt = targets and fb and device == "cuda"
        for metric, num, tgt in (
            ("LongLoRA time / ours", LONGLORA, 1.5 if (cpu_tgt or gpu_tgt) else None),
            ("SDPA bool-mask time / ours", BOOL, 6.0 if cpu_tgt else None),
            ("Flex time / ours", FLEX, 1.3 if gpu_tgt else None),
            ("dense causal SDPA time / ours", DENSE, None),
        ):
            H.add_speed_ratio(report, case, metric, times, num, OURS, tgt)
        # TFLOP/s on unmasked pairs: (pairs / t_ours) / (pairs_causal / t_flash)
        H.add_speed_ratio(
            report,
            case,
            "ours TFLOP/s / dense flash TFLOP/s",
            times,
            FLASH,
            OURS,
            1.0 if gpu_tgt else None,
            scale=pairs / pairs_causal,
        )
    del impls
    if device == "cuda":
        torch.cuda.empty_cache()


def sqa_cases(report, device, n, d, dtype, n_rounds, targets=True):
    b = 1
    gen = torch.Generator(device=device).manual_seed(1000 + n)
    case = f"SQA N={n} d={d} causal fwd+bwd"
    h_mha = SQA_VARIANTS[0][1]
    fns, keep = [], []
    for name, hq, hkv in SQA_VARIANTS:
        q = torch.randn(b, n, hq, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        k = torch.randn(b, n, hkv, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        v = torch.randn(b, n, hkv, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        heads = max(hq, hkv)
        go = torch.randn(b, n, heads, d, device=device, dtype=dtype, generator=gen)
        pairs = count_pairs(n, n, heads, causal=True)
        params = {
            "B": b,
            "N": n,
            "H_q": hq,
            "H_kv": hkv,
            "d": d,
            "dtype": str(dtype).replace("torch.", ""),
            "pairs": pairs,
        }
        fn = _fwd_bwd(
            lambda q=q, k=k, v=v: longtune.sparse_attention(q, k, v, causal=True), (q, k, v), go
        )
        fns.append((name, f"{name} ({hq}q/{hkv}kv)", fn, params, 14 * pairs * d))
        keep.append((q, k, v, go))
    # round-robin and compared round by round (see s2_cases)
    times = H.measure_interleaved(
        report,
        case,
        [(impl, fn) for _, impl, fn, _, _ in fns],
        device,
        None,
        rounds=n_rounds,
        flops={impl: fl for _, impl, _, _, fl in fns},
        impl_params={impl: pa for _, impl, _, pa, _ in fns},
    )
    times = {name: times[impl] for name, impl, *_ in fns if impl in times}
    del keep, fns
    if device == "cuda":
        torch.cuda.empty_cache()
    for name, hq, _ in SQA_VARIANTS[1:]:
        ideal = h_mha / hq
        H.add_speed_ratio(
            report,
            case,
            f"{name} speedup / ideal (H/H_q={ideal:g})",
            times,
            "MHA",
            name,
            0.9 if targets else None,
            scale=1 / ideal,
        )


def run(device: str, out_dir: str, quick: bool = False) -> H.Report:
    report = H.Report("attention", quick=quick)
    torch.manual_seed(0)
    if device == "cuda":
        dtype, h, d, r = torch.bfloat16, 8, 128, H.rounds(30)
        ns = [8192] if quick else [8192, 16384, 32768, 65536]
        sqa_ns = [8192] if quick else [32768, 65536]
        for n in ns:
            try:
                s2_cases(report, device, n, h, d, dtype, r, peers_bool=False)
            except torch.cuda.OutOfMemoryError:
                print(f"[attention] S2 N={n}: out of GPU memory, skipped", file=sys.stderr)
                torch.cuda.empty_cache()
        for n in sqa_ns:
            try:
                sqa_cases(report, device, n, d, dtype, r, targets=n >= 32768)
            except torch.cuda.OutOfMemoryError:
                print(f"[attention] SQA N={n}: out of GPU memory, skipped", file=sys.stderr)
                torch.cuda.empty_cache()
    else:
        dtype, h, d = torch.float32, 8, 64
        if quick:
            # the targets are for N = 4096: at N = 1024 the ratios are printed without them
            s2_cases(report, device, 1024, h, d, dtype, H.rounds(9), peers_bool=True, targets=False)
            sqa_cases(report, device, 1024, d, dtype, H.rounds(9), targets=False)
        else:
            s2_cases(report, device, 4096, h, d, dtype, H.rounds(21), peers_bool=True)
            sqa_cases(report, device, 4096, d, dtype, H.rounds(15))
            sqa_cases(report, device, 8192, d, dtype, H.rounds(9))
    H.write(report, out_dir, device, plot)
    return report


if __name__ == "__main__":
    H.cli(run)
