"""The emulator's per-launch counters (longtune.testing.emulator_counters): what the CUDA kernels
issue, counted on the CPU emulator. Each element is read and written once by the Hadamard and
quantization kernels; the attention forward loads and multiplies only the key / value tiles its
mask leaves non-empty, each once per query tile; the attention backward issues each MMA once;
the fused cross-entropy's share of tensor-core FLOPs in its logits GEMM."""

import math

import pytest
import torch

from longtune import AttentionMask
from longtune.reference.attention import attention_mask
from longtune.testing import emulated, emulator_counters, emulator_grid_cap

EMU = torch.ops.longtune_emu


def _launches_of(c, prefix):
    runs = c.kernels(prefix)
    assert runs, f"no launch of {prefix}* recorded: {[r['kernel'] for r in c.launches]}"
    return runs


# ------------------------------------------------------------------------------ the switch


def test_off_by_default_and_results_unchanged():
    x = torch.randn(5, 1024, dtype=torch.bfloat16)
    plain = EMU.hadamard_transform(x, 0.03125)
    assert EMU.counters() == []  # nothing is recorded while counting is off
    with emulator_counters() as c:
        counted = EMU.hadamard_transform(x, 0.03125)
    assert torch.equal(plain, counted)
    assert len(c.launches) == 1
    assert EMU.counters() == []  # the context manager leaves nothing behind
    assert EMU.set_counters(False) is False  # and restores "off"


def test_switch_and_reset():
    assert EMU.set_counters(True) is False
    try:
        EMU.hadamard_transform(torch.randn(2, 64), 1.0)
        EMU.hadamard_transform(torch.randn(2, 128), 1.0)
        assert len(EMU.counters()) == 2
        with emulator_counters() as c:  # nested: sees only its own launches, keeps counting on
            EMU.hadamard_transform(torch.randn(2, 256), 1.0)
        assert len(c.launches) == 1
        assert len(EMU.counters()) == 3
        EMU.reset_counters()
        assert EMU.counters() == []
    finally:
        assert EMU.set_counters(False) is True
        EMU.reset_counters()


def test_geometry_fields():
    x = torch.randn(37, 64)
    with emulator_counters() as c:
        EMU.hadamard_transform(x, 1.0)
    (r,) = c.launches
    gx, gy, gz = r["grid"]
    bx, by, bz = r["block"]
    assert r["blocks"] == gx * gy * gz
    assert r["threads"] == r["blocks"] * bx * by * bz
    assert r["mma_flops"] == 0 and r["ldmatrix_bytes"] == 0


@pytest.mark.parametrize("threads", [32, 96])
def test_exact_counts_of_a_small_kernel(threads):
    # faulty_kernel(x, 1): s[t] = x[t]; sync_block(); y[t] = s[(t + 1) % n], one block
    x = torch.randn(threads)
    with emulator_counters() as c:
        y = EMU.faulty_kernel(x, 1)
    (r,) = c.launches
    assert r["kernel"] == "faulty_kernel" and r["blocks"] == 1 and r["threads"] == threads
    assert r["barriers"] == 1
    assert r["global_by_tensor"] == {
        "x": {"read": 4 * threads, "written": 0},
        "y": {"read": 0, "written": 4 * threads},
    }
    assert r["shared_read_bytes"] == r["shared_write_bytes"] == r["smem_bytes"] == 4 * threads
    assert r["mma_flops"] == r["ldmatrix"] == r["cp_async"] == 0
    torch.testing.assert_close(y, torch.roll(x, -1))


def test_a_reported_launch_leaves_no_record():
    x = torch.arange(64, dtype=torch.float32)
    with emulator_counters() as c:
        with pytest.raises(RuntimeError, match="deadlock"):
            EMU.faulty_kernel(x, 2)
        EMU.faulty_kernel(x, 1)
    assert [r["barriers"] for r in c.launches] == [1]


# ------------------------------------------------------------------------------ Hadamard


def _elem(t):
    return t.numel() * t.element_size()


@pytest.mark.parametrize(
    "m, p2, dtype, misaligned, cap",
    [
        (1, 64, torch.float32, False, 0),  # warp mode
        (1, 256, torch.float16, True, 0),  # warp mode, scalar loads
        (1, 2048, torch.bfloat16, False, 0),  # block mode
        (1, 4096, torch.float32, False, 1),  # block mode, one block walks every row
        (12, 64, torch.bfloat16, False, 0),  # factor m = 12: its sign bits are read too
        (20, 8, torch.float16, True, 2),
    ],
)
@pytest.mark.parametrize("transpose", [False, True])
def test_hadamard_reads_and_writes_each_element_once(m, p2, dtype, misaligned, cap, transpose):
    rows, n = 7, m * p2
    x = torch.randn(rows, n + int(misaligned), dtype=dtype)
    if misaligned:
        x = x[:, 1:]  # rows at odd element offsets: scalar loads
    op = EMU.hadamard_transform_backward if transpose else EMU.hadamard_transform
    with emulator_grid_cap(cap), emulator_counters() as c:
        y = op(x, 0.5)
    runs = _launches_of(c, "hadamard")
    assert len(runs) == 1
    r = runs[0]
    by = r["global_by_tensor"]
    assert by["x"] == {"read": _elem(x), "written": 0}
    assert by["y"] == {"read": 0, "written": _elem(y)}
    # besides x, only the sign bits of a non-power-of-two factor m: one 32-bit word per 32 terms
    # of the m-term mix, read once for a whole chunk of E = min(8, P) outputs
    assert set(by) <= {"x", "y", "hbits"}
    params = by.get("hbits", {"read": 0, "written": 0})
    chunk = min(8, p2)
    words = (y.numel() // chunk) * ((m + 31) // 32) if m > 1 else 0
    assert params["written"] == 0 and params["read"] == 4 * words
    assert r["global_read_bytes"] == _elem(x) + params["read"]
    assert r["global_write_bytes"] == _elem(y)


# ------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize(
    "n, gran, gsz, sym, dtype",
    [
        (128, "per_token", 0, True, torch.float32),
        (256, "per_group", 32, False, torch.bfloat16),
        (2048, "per_group", 128, True, torch.float16),
    ],
)
def test_quant_reads_and_writes_each_element_once(n, gran, gsz, sym, dtype):
    rows = 5
    x = torch.randn(rows, n, dtype=dtype)
    args = (4, gran, gsz, sym, 0.9, True, 0)
    with emulator_counters() as c:
        y = EMU.rotate_fake_quant(x, *args, "identity")
        codes, scales, zeros = EMU.rotate_quantize(x, *args)
    assert len(c.launches) == 2, [r["kernel"] for r in c.launches]
    fake, export = c.launches
    # the input once, each output once, nothing else
    assert fake["global_by_tensor"] == {
        "x": {"read": _elem(x), "written": 0},
        "y": {"read": 0, "written": _elem(y)},
    }
    assert export["global_by_tensor"] == {
        "x": {"read": _elem(x), "written": 0},
        "codes": {"read": 0, "written": _elem(codes)},
        "scales": {"read": 0, "written": _elem(scales)},
        "zeros": {"read": 0, "written": _elem(zeros)},
    }
    for r in (fake, export):
        assert r["global_read_bytes"] == _elem(x)
    assert fake["global_write_bytes"] == _elem(y)
    assert export["global_write_bytes"] == _elem(codes) + _elem(scales) + _elem(zeros)


# ------------------------------------------------------------------------------ attention

# forward key-tile rows per head dim (AttnTraits in csrc/cuda/attention/attn_head_dims.h); query
# tile rows: 16 per warp
FWD_BK = {64: 64, 128: 64, 256: 32}


def _expected_tiles(nq, nk, heads, mask, bq, bk):
    """Per output head and query tile, the key tiles the mask leaves non-empty (reference mask at
    tile granularity), checked against the kernels' own tile ranges (attention_mask_ranges)."""
    out = []
    for e in range(heads):
        dense = attention_mask(
            nq,
            nk,
            shifted=mask.shifted(e, heads),
            causal=mask.causal,
            s2_group_size=mask.s2_group_size,
            s2_mode=mask.s2_mode if mask.s2_group_size else "leakfree",
        )
        for qt in range(math.ceil(nq / bq)):
            i0, i1 = qt * bq, min(nq, (qt + 1) * bq)
            tiles = [
                kt
                for kt in range(math.ceil(nk / bk))
                if dense[i0:i1, kt * bk : (kt + 1) * bk].any()
            ]
            rng = torch.ops.longtune.attention_mask_ranges(
                nq, nk, e, heads, mask.to_list(), False, i0, i1, bk
            )
            listed = [kt for lo, hi in rng.tolist() for kt in range(lo, hi)]
            assert listed == tiles, (e, qt, listed, tiles)
            out.append((qt, tiles))
    return out


@pytest.mark.parametrize(
    "d, n, heads, mask",
    [
        (64, 256, 2, AttentionMask(causal=True, s2_group_size=32)),  # groups smaller than a tile
        (64, 256, 4, AttentionMask(causal=False, s2_group_size=64)),
        (128, 192, 2, AttentionMask(causal=True, s2_group_size=16)),
        (256, 128, 2, AttentionMask(causal=True)),
    ],
    ids=["s2-32-causal", "s2-64", "s2-16-d128", "causal-d256"],
)
def test_attention_forward_loads_only_needed_tiles(d, n, heads, mask):
    torch.manual_seed(0)
    dtype = torch.float16
    q, k, v = (torch.randn(1, n, heads, d, dtype=dtype) for _ in range(3))
    with emulator_counters() as c:
        out, lse = EMU.sparse_attention_fwd(
            q, k, v, None, None, None, 0, 0, 1.0 / math.sqrt(d), mask.to_list(), 0.0
        )
    (r,) = _launches_of(c, "attn_fwd")
    bq, bk = 16 * r["block"][0] // 32, FWD_BK[d]
    tiles = _expected_tiles(n, n, heads, mask, bq, bk)
    n_tiles = sum(len(t) for _, t in tiles)
    assert 0 < n_tiles < heads * math.ceil(n / bq) * math.ceil(n / bk) or not mask.s2_group_size
    # each non-empty key / value tile once per query tile, no other
    tile_bytes = sum(min(bk, n - kt * bk) * d * 2 for _, ts in tiles for kt in ts)
    by = r["global_by_tensor"]
    assert by["k"] == {"read": tile_bytes, "written": 0}
    assert by["v"] == {"read": tile_bytes, "written": 0}
    assert by["q"] == {"read": _elem(q), "written": 0}
    assert by["out"] == {"read": 0, "written": _elem(out)}
    assert by["lse"] == {"read": 0, "written": _elem(lse)}
    assert r["cp_async_bytes"] == _elem(q) + 2 * tile_bytes
    # Q K^T and P V on tensor cores, tile by tile: 2 * 2 * (bq x bk pairs) * d per non-empty tile
    assert r["mma_flops"] == 4 * bq * bk * d * n_tiles
    assert r["mma_m16n8k16"] * 2 * 16 * 8 * 16 == r["mma_flops"]
    # two barriers per key tile; the fragments come from shared memory through ldmatrix
    assert r["barriers"] == 2 * n_tiles
    assert 0 < r["ldmatrix_bytes"] <= r["shared_read_bytes"]


# backward (key tile rows, query tile rows) per head dim (AttnTraits)
BWD_TILES = {64: (64, 64), 80: (64, 64), 128: (64, 64), 256: (64, 32)}


@pytest.mark.parametrize("d", sorted(BWD_TILES))
def test_attention_backward_issues_each_mma_once(d):
    # dense attention over whole tiles: S^T, dP^T, dV, dK and dQ, 2 * n * n * d FLOPs each per head,
    # also where the warps of a row group split the work (d >= 80: P^T / dS^T through shared
    # memory, no S^T / dP^T computed twice); three barriers per (key tile, query tile) pair where
    # they do, two where they do not (the end-of-tile barrier guards only the exchange's reads)
    torch.manual_seed(0)
    n, heads = 128, 2
    q, k, v, go = (torch.randn(1, n, heads, d, dtype=torch.float16) for _ in range(4))
    args = (None, None, None, 0, 0, 1.0 / math.sqrt(d), AttentionMask(causal=False).to_list(), 0.0)
    out, lse = EMU.sparse_attention_fwd(q, k, v, *args)
    with emulator_counters() as c:
        EMU.sparse_attention_bwd(go, q, k, v, out, lse, *args)
    (r,) = _launches_of(c, "attn_bwd<")
    assert r["mma_flops"] == 5 * 2 * n * n * d * heads
    assert r["mma_m16n8k16"] * 2 * 16 * 8 * 16 == r["mma_flops"]
    bk, bq = BWD_TILES[d]
    per_pair = 3 if d >= 80 else 2
    assert r["barriers"] == per_pair * heads * (n // bk) * (n // bq)


# ------------------------------------------------------------------------------ cross-entropy


def _cross_entropy_mma_share(T=64, V=256, d=64):
    torch.manual_seed(0)
    x = torch.randn(T, d, dtype=torch.bfloat16)
    w = torch.randn(V, d, dtype=torch.bfloat16) / 8
    target = torch.randint(0, V, (T,))
    fwd = emulated("linear_cross_entropy_fwd")
    with emulator_counters() as c:
        fwd(x, w, None, target, -100, 0.0, 0.0, 0.0)
    runs = _launches_of(c, "cross_entropy_fwd")
    by_x, _ = c.tensor_bytes("x", "cross_entropy_fwd")
    by_w, _ = c.tensor_bytes("weight", "cross_entropy_fwd")
    assert by_x >= T * d * 2 and by_w >= V * d * 2  # the counters see the kernel's operand loads
    return sum(r["mma_flops"] for r in runs) / (2 * T * V * d)


def test_cross_entropy_mma_share_is_measured():
    share = _cross_entropy_mma_share()
    print(f"cross-entropy forward: mma share of the logits GEMM = {share:.3f}")
    assert 0.0 <= share <= 1.0 + 1e-9


def test_cross_entropy_logits_on_tensor_cores():
    # bf16: the logits GEMM is issued as mma.m16n8k16 (a padded edge tile may add a little more)
    assert _cross_entropy_mma_share() >= 0.95


def _mma_flops(c, prefix):
    return sum(r["mma_flops"] for r in c.launches if r["kernel"].startswith(prefix))


@pytest.mark.parametrize("rows", [0, 64], ids=["one-chunk", "rows64"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_cross_entropy_one_pass_issues_three_quarters_of_the_mma(dtype, rows, monkeypatch):
    # the one-pass linear_cross_entropy_fwd_bwd forms the logits once (3 GEMMs: logits, dx, dW),
    # forward + backward twice (4: the backward recomputes them); whole tiles, every row live
    if rows:
        monkeypatch.setenv("LT_LCE_DEVICE_ROWS", str(rows))
    torch.manual_seed(0)
    T, V, d = 128, 256, 64
    x = torch.randn(T, d, dtype=dtype)
    w = (torch.randn(V, d) / 8).to(dtype)
    b = torch.randn(V, dtype=dtype)
    target = torch.randint(0, V, (T,))
    grad = torch.full((T,), 1.0 / T)
    opts = (-100, 0.1, 1e-3, 0.0)
    with emulator_counters() as one:
        emulated("linear_cross_entropy_fwd_bwd")(x, w, b, target, grad, *opts)
    with emulator_counters() as two:
        loss, lse, amax = emulated("linear_cross_entropy_fwd")(x, w, b, target, *opts)
        emulated("linear_cross_entropy_bwd")(grad, x, w, b, target, lse, *opts, 0.0)
    kernels = {r["kernel"] for r in one.launches}
    assert "cross_entropy_onepass_fwd_kernel" in kernels
    assert "cross_entropy_onepass_bwd_kernel" in kernels
    assert "cross_entropy_bwd_kernel" not in kernels and "cross_entropy_fwd_kernel" not in kernels
    f1 = _mma_flops(one, "cross_entropy")
    f2 = _mma_flops(two, "cross_entropy")
    gemm = 3 * 2 * T * V * d  # logits, dx, dW
    print(f"cross-entropy one pass / forward + backward mma FLOPs = {f1 / f2:.4f}")
    print(f"cross-entropy one pass: mma share of its GEMMs = {f1 / gemm:.3f}")
    assert f2 > 0 and 4 * f1 == 3 * f2
    assert f1 >= 0.95 * gemm
