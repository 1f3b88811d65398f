"""Rotated quantization (RoSTE): longtune's fused rotate + fake-quant vs its unfused peers.

- fused `longtune.rotate_fake_quant` vs `longtune.hadamard_transform` followed by a PyTorch
  quantize-dequantize (the reference formula, eager), and vs the copy ceiling (`torch.clone`);
  target: >= 2x the unfused path on CPU (rows of 4096, 8192 tokens); >= 80% of copy bandwidth in
  bf16 on GPU.
- the R2/R4 rotation as the FWHT vs the dense float64 matrix product the official RoSTE code uses
  (target >= 10x at d = 4096 on CPU).
"""

from __future__ import annotations

import math

import torch

import longtune  # noqa: E402
from benchmarks import harness as H  # noqa: E402
from longtune.ops.quant import quant_flops  # noqa: E402
from longtune.reference import quant as Q  # noqa: E402

plot = H.grouped_bars("Rotated quantization")


def run(device: str, out_dir: str, quick: bool = False) -> H.Report:
    report = H.Report("quant", quick=quick)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens = 8192 if not quick else 2048
    n_rounds = H.rounds(9 if quick else 15)
    tg = not quick  # the targets are for 8192 tokens; --quick reports its ratios without them
    configs = [
        (4096, "per_token", None, True),
        (4096, "per_group", 128, False),
        (11008, "per_token", None, True),
    ]
    for n, gran, gsz, sym in H.progress(configs, "quant"):
        if device == "cpu" and n > 4096 and quick:
            continue
        x = torch.randn(tokens, n, device=device, dtype=dtype)
        case = f"n={n} {gran}{'/' + str(gsz) if gsz else ''} {'sym' if sym else 'asym'}"
        params = {
            "n": n,
            "tokens": tokens,
            "granularity": gran,
            "group_size": gsz,
            "symmetric": sym,
            "dtype": str(dtype).replace("torch.", ""),
        }
        nbytes = 2 * x.numel() * x.element_size()
        flops = quant_flops(x.shape, True, 0)
        kw = dict(bits=4, granularity=gran, group_size=gsz, symmetric=sym)

        def unfused(x=x, gran=gran, gsz=gsz, sym=sym):
            r = longtune.hadamard_transform(x.float())
            return Q.fake_quant(r, 4, gran, gsz, sym, 1.0).to(dtype)

        impls = [
            ("longtune fused", lambda x=x, kw=kw: longtune.rotate_fake_quant(x, **kw)),
            ("FWHT + torch quantizer", unfused),
            ("torch.clone", lambda x=x: x.clone()),
        ]
        t = H.measure_interleaved(
            report,
            case,
            impls,
            device,
            params,
            rounds=n_rounds,
            flops={"longtune fused": flops, "FWHT + torch quantizer": flops},
            nbytes={name: nbytes for name, _ in impls},
        )
        H.add_speed_ratio(
            report,
            case,
            "speedup vs FWHT + torch quantizer",
            t,
            "FWHT + torch quantizer",
            "longtune fused",
            2.0 if tg and device == "cpu" and n == 4096 else None,
        )
        H.add_speed_ratio(
            report,
            case,
            "fraction of torch.clone bandwidth",
            t,
            "torch.clone",
            "longtune fused",
            0.8 if tg and device == "cuda" else None,
        )
    # R2 / R4 as a dense float64 product (official RoSTE) vs the FWHT
    d, rows = 4096, 1024 if not quick else 256
    x = torch.randn(rows, d, device=device, dtype=dtype)
    Hd = longtune.hadamard_matrix(d, dtype=torch.float64, device=device) / math.sqrt(d)
    case = f"R4 rotation d={d} rows={rows}"
    params = {"d": d, "rows": rows}
    t = H.measure_interleaved(
        report,
        case,
        [
            ("longtune FWHT", lambda: longtune.hadamard_transform(x)),
            ("dense float64 x @ H", lambda: (x.double() @ Hd).to(dtype)),
        ],
        device,
        params,
        rounds=n_rounds,
    )
    H.add_speed_ratio(
        report,
        case,
        "speedup vs dense float64 matmul",
        t,
        "dense float64 x @ H",
        "longtune FWHT",
        10.0 if tg and device == "cpu" else None,
    )
    _qat_step(report, device, quick, n_rounds)
    H.write(report, out_dir, device, plot)
    return report


def _qat_step(report, device, quick, n_rounds):
    """A QAT training step (forward + backward + AdamW) of a tiny Llama with RoSTE (W4A4KV4, all
    rotations) vs the same step without quantization. Target: <= 1.5x (reported as plain step time /
    RoSTE step time >= 1/1.5)."""
    try:
        import transformers
    except ImportError:
        return
    import copy

    from longtune.quant import prepare_roste

    torch.manual_seed(0)
    hidden, layers, seq, batch = (256, 4, 128, 4) if not quick else (128, 2, 64, 2)
    cfg = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
        attn_implementation="sdpa",
    )
    base = transformers.LlamaForCausalLM(cfg).to(device).train()
    roste = prepare_roste(copy.deepcopy(base)).train()
    ids = torch.randint(0, 1024, (batch, seq), device=device)
    case = f"QAT step tiny Llama h={hidden} L={layers} seq={seq} b={batch}"
    params = {"hidden": hidden, "layers": layers, "seq": seq, "batch": batch}
    steps = []
    for name, model in [("no quantization", base), ("RoSTE W4A4KV4", roste)]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            loss = model(ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps.append((name, step))
    t = H.measure_interleaved(report, case, steps, device, params, rounds=n_rounds)
    H.add_speed_ratio(
        report,
        case,
        "plain step time / RoSTE step time",
        t,
        "no quantization",
        "RoSTE W4A4KV4",
        None if quick else round(1 / 1.5, 4),
    )


if __name__ == "__main__":
    H.cli(run)
