"""Cases and checks shared by the emulated (tests/test_attention_emulated.py) and the real-GPU
(tests/cuda/test_attention_cuda.py) tests of the sparse-attention CUDA kernels: forward (out, lse)
and backward (dq, dk, dv) against the float64 reference, with the error rule of every kernel test
(at most 2x the error of the PyTorch reference run in the same dtype)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longtune import AttentionMask
from longtune.reference.attention import sparse_attention
from longtune.testing import assert_within_2x


@dataclass
class Case:
    name: str
    nq: int = 70
    nk: int | None = None  # None: = nq
    hq: int = 1
    hkv: int = 1
    d: int = 64
    batch: int = 1
    causal: bool = True
    group: int = 0
    mode: str = "none"
    wl: int = -1
    wr: int = -1
    n_global: int = 0
    q_offset: int = -1
    kv_offset: int = 0
    head_offset: int = 0  # the local heads are [head_offset, head_offset + H) of total_heads
    total_heads: int = 0
    pad: list | None = None  # batched: per sequence (left, right) padded keys
    cu_q: list | None = None  # packed: offsets
    cu_k: list | None = None
    scale: float | None = None
    softcap: float = 0.0  # logit softcapping (0: off)
    extra: dict = field(default_factory=dict)

    def __str__(self):
        return self.name


def _tensors(c: Case, dtype, device, scale_qk=1.0):
    nk = c.nk if c.nk is not None else c.nq
    if c.cu_q is not None:
        qs, ks = (c.cu_q[-1], c.hq, c.d), (c.cu_k[-1], c.hkv, c.d)
        os_ = (c.cu_q[-1], max(c.hq, c.hkv), c.d)
    else:
        qs, ks = (c.batch, c.nq, c.hq, c.d), (c.batch, nk, c.hkv, c.d)
        os_ = (c.batch, c.nq, max(c.hq, c.hkv), c.d)
    g = torch.Generator().manual_seed(hash(c.name) % (2**31))
    q = (torch.randn(qs, generator=g) * scale_qk).to(device=device, dtype=dtype)
    k = (torch.randn(ks, generator=g) * scale_qk).to(device=device, dtype=dtype)
    v = torch.randn(ks, generator=g).to(device=device, dtype=dtype)
    go = torch.randn(os_, generator=g).to(device=device, dtype=dtype)
    kpm = None
    if c.pad is not None:
        kpm = torch.ones(c.batch, nk, dtype=torch.bool)
        for b, (left, right) in enumerate(c.pad):
            kpm[b, :left] = False
            if right:
                kpm[b, nk - right :] = False
        kpm = kpm.to(device)
    return q, k, v, go, kpm


def _op_args(c: Case, kpm, device):
    cu_q = cu_k = None
    max_q = max_k = 0
    if c.cu_q is not None:
        cu_q = torch.tensor(c.cu_q, dtype=torch.int32, device=device)
        cu_k = torch.tensor(c.cu_k, dtype=torch.int64, device=device)
        max_q = max(b - a for a, b in zip(c.cu_q, c.cu_q[1:]))
        max_k = max(b - a for a, b in zip(c.cu_k, c.cu_k[1:]))
    scale = c.scale if c.scale is not None else 1.0 / math.sqrt(c.d)
    return (kpm, cu_q, cu_k, max_q, max_k, scale, case_mask(c).to_list(), c.softcap)


def case_mask(c: Case) -> AttentionMask:
    return AttentionMask(
        causal=c.causal,
        s2_group_size=c.group,
        s2_mode=c.mode,
        window_left=c.wl,
        window_right=c.wr,
        n_global=c.n_global,
        q_offset=c.q_offset,
        kv_offset=c.kv_offset,
        head_offset=c.head_offset,
        total_heads=c.total_heads,
    )


def _reference(c: Case, q, k, v, kpm, dtype):
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = sparse_attention(
        qq,
        kk,
        vv,
        softmax_scale=c.scale if c.scale is not None else 1.0 / math.sqrt(c.d),
        key_padding_mask=kpm,
        cu_seqlens=c.cu_q,
        cu_seqlens_k=c.cu_k,
        softcap=c.softcap or None,
        return_lse=True,
        **case_mask(c).to_keywords(),
    )
    return out, lse, (qq, kk, vv)


def _check_lse(lse, ref64, ref_same, what):
    inf = torch.isinf(ref64)
    assert torch.equal(torch.isinf(lse.cpu()) & (lse.cpu() < 0), inf), f"{what}: -inf rows differ"
    fin = ~inf
    assert_within_2x(lse.cpu()[fin], ref64[fin].float().double(), ref_same[fin], what)


def check_case(fwd, bwd, device, c: Case, dtype, backward=True):
    # softcapped cases: larger scores, so that the tanh saturates on part of them
    q, k, v, go, kpm = _tensors(c, dtype, device, scale_qk=2.0 if c.softcap else 1.0)
    args = _op_args(c, kpm, device)
    out, lse = fwd(q, k, v, *args)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.device == q.device
    o64, l64, leaves64 = _reference(c, q, k, v, kpm, torch.float64)
    olo, llo, leaves_lo = _reference(c, q, k, v, kpm, dtype)
    assert_within_2x(out.cpu(), o64.detach().cpu(), olo.detach().cpu(), f"{c.name} out")
    _check_lse(lse, l64.cpu(), llo.cpu(), f"{c.name} lse")
    if not backward:
        return
    dq, dk, dv = bwd(go, q, k, v, out, lse, *args)
    o64.backward(go.double())
    olo.backward(go)
    for name, got, ref, same in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves64, leaves_lo):
        assert got.shape == ref.shape and got.dtype == dtype, (
            f"{c.name} {name}: {got.shape} {got.dtype}"
        )
        assert_within_2x(got.cpu(), ref.grad.cpu(), same.grad.cpu(), f"{c.name} {name}")


def _head_dims():
    """The head dims the CUDA kernels are compiled for, read from their single definition
    (LT_ATTN_HEAD_DIMS in csrc/cuda/attention/attn_head_dims.h, as CMakeLists.txt reads it)."""
    header = (
        Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "attention" / "attn_head_dims.h"
    )
    line = next(
        ln
        for ln in header.read_text().splitlines()
        if ln.startswith("#define LT_ATTN_HEAD_DIMS(X)")
    )
    return tuple(int(x) for x in re.findall(r"X\((\d+)\)", line))


HEAD_DIMS = _head_dims()
# the tile shapes differ from d = 64's at these (attn_head_dims.h: AttnTraits)
NEW_SHAPE_HEAD_DIMS = (32, 80, 96, 128, 160, 192, 256)


def _head_dim_cases(d):
    """Each mask family at head dim d: several query and key tiles, partial last tiles."""
    return [
        Case(f"hd{d}_causal_gqa", nq=70, hq=4, hkv=2, d=d),
        Case(f"hd{d}_s2_leakfree", nq=72, hq=2, hkv=2, group=16, mode="leakfree", d=d),
        Case(f"hd{d}_s2_roll", nq=72, hq=2, hkv=2, group=16, mode="longlora_roll", d=d),
        Case(f"hd{d}_window_global", nq=100, wl=40, n_global=4, d=d),
        Case(f"hd{d}_key_padding", nq=70, batch=2, causal=False, pad=[(0, 13), (20, 3)], d=d),
        Case(f"hd{d}_varlen", cu_q=[0, 30, 50, 120], cu_k=[0, 40, 40, 130], nq=0, hq=2, hkv=1, d=d),
    ]


# Small cases (the emulator runs every warp collective as a thread rendezvous).
CASES = [
    Case("causal", nq=70, hq=2, hkv=2),
    Case("noncausal", nq=100, causal=False),
    Case("s2_leakfree", nq=100, hq=2, hkv=2, group=16, mode="leakfree"),
    Case("s2_roll", nq=72, hq=2, hkv=2, group=16, mode="longlora_roll"),
    Case("s2_roll_noncausal", nq=40, hq=2, hkv=2, group=12, mode="longlora_roll", causal=False),
    Case("window_global", nq=130, wl=40, n_global=4),
    Case("lambda_gap", nq=200, wl=40, n_global=4),  # last query tile: key tiles {0} u {2, 3}
    Case("window_two_sided", nq=100, causal=False, wl=20, wr=10),
    Case("gqa", nq=70, hq=4, hkv=2),
    Case("mqa", nq=70, hq=2, hkv=1, causal=False),
    Case("rsqa", nq=70, hq=1, hkv=2),
    Case("key_padding", nq=70, batch=2, causal=False, pad=[(0, 13), (20, 3)]),
    Case("key_padding_causal", nq=70, batch=2, pad=[(5, 0), (0, 30)]),
    Case("varlen", cu_q=[0, 30, 50, 120], cu_k=[0, 40, 40, 130], nq=0, hq=2, hkv=1),
    Case("bottom_right", nq=40, nk=100),
    Case("offsets_window", nq=40, nk=100, q_offset=30, kv_offset=5, wl=24, n_global=2),
    Case("hd80", nq=70, d=80),
    Case("hd96", nq=70, d=96, causal=False),
    Case("hd128", nq=70, d=128),
    # logit softcapping (Gemma-2) with each mask family
    Case("softcap_causal_gqa", nq=70, hq=4, hkv=2, softcap=2.0),
    Case("softcap_s2_leakfree", nq=100, hq=2, hkv=2, group=16, mode="leakfree", softcap=3.0),
    Case("softcap_s2_roll", nq=72, hq=2, hkv=2, group=16, mode="longlora_roll", softcap=2.0),
    Case(
        "softcap_lambda_offsets",
        nq=40,
        nk=100,
        q_offset=30,
        kv_offset=5,
        wl=24,
        n_global=2,
        softcap=2.5,
    ),
    Case("softcap_key_padding", nq=70, batch=2, causal=False, pad=[(0, 13), (20, 3)], softcap=2.0),
    Case(
        "softcap_varlen",
        cu_q=[0, 30, 50, 120],
        cu_k=[0, 40, 40, 130],
        nq=0,
        hq=2,
        hkv=1,
        softcap=2.0,
    ),
    # sequence-parallel shards: heads [2, 4) of 4 (both shifted), [1, 3) of 4 (one of each), and a
    # query shard whose keys start before it (a halo: negative kv_offset, global tokens at [0, n_global))
    Case(
        "head_offset_shifted",
        nq=70,
        hq=2,
        hkv=2,
        group=16,
        mode="leakfree",
        head_offset=2,
        total_heads=4,
    ),
    Case(
        "head_offset_gqa_roll",
        nq=72,
        hq=2,
        hkv=1,
        group=16,
        mode="longlora_roll",
        head_offset=1,
        total_heads=4,
    ),
    Case(
        "halo_negative_kv_offset",
        nq=40,
        nk=70,
        hq=2,
        hkv=2,
        group=16,
        mode="leakfree",
        kv_offset=-30,
    ),
    Case("halo_window_global", nq=40, nk=100, kv_offset=-20, q_offset=60, wl=24, n_global=3),
]
# head dims with their own tile shapes: every mask family, and softcapping at 256 (Gemma)
CASES += [c for d in NEW_SHAPE_HEAD_DIMS for c in _head_dim_cases(d)]
CASES += [
    Case("hd256_softcap_s2_gqa", nq=72, hq=4, hkv=2, group=16, mode="leakfree", softcap=2.0, d=256)
]

# Larger cases for a real GPU (several tiles per sequence, both tile-range pieces, many blocks).
GPU_CASES = [
    Case("causal_gqa_hd128", nq=1000, hq=4, hkv=2, d=128, batch=2),
    Case("noncausal_hd64", nq=777, nk=1200, hq=2, hkv=2, causal=False, batch=2),
    Case("s2_leakfree_long", nq=2000, hq=4, hkv=4, group=256, mode="leakfree"),
    Case("s2_roll_long", nq=1500, hq=4, hkv=2, group=200, mode="longlora_roll"),
    Case("lambda_mask", nq=1500, hq=2, hkv=1, wl=300, n_global=70, d=96),
    Case("window_two_sided", nq=900, causal=False, wl=150, wr=90, hq=2, hkv=2, d=80),
    Case("rsqa", nq=600, hq=2, hkv=4),
    Case(
        "key_padding", nq=500, batch=3, hq=2, hkv=2, causal=False, pad=[(0, 100), (130, 7), (0, 0)]
    ),
    Case(
        "varlen",
        cu_q=[0, 300, 301, 1000, 1000, 1500],
        cu_k=[0, 400, 500, 1200, 1300, 1800],
        nq=0,
        hq=4,
        hkv=1,
    ),
    Case(
        "chunk_offsets",
        nq=256,
        nk=3000,
        q_offset=1900,
        kv_offset=100,
        wl=1024,
        n_global=4,
        hq=2,
        hkv=2,
    ),
    Case("softcap_gqa_hd128", nq=1000, hq=4, hkv=2, d=128, batch=2, softcap=2.0),
    Case(
        "softcap_s2_varlen",
        cu_q=[0, 300, 301, 1000],
        cu_k=[0, 400, 500, 1200],
        nq=0,
        hq=4,
        hkv=2,
        group=64,
        mode="leakfree",
        softcap=3.0,
    ),
    Case(
        "head_offset_s2_long",
        nq=1000,
        hq=4,
        hkv=2,
        group=128,
        mode="leakfree",
        head_offset=6,
        total_heads=16,
    ),
    Case("halo_s2_long", nq=1024, nk=1536, hq=4, hkv=4, group=256, mode="leakfree", kv_offset=-512),
    Case("causal_gqa_hd256", nq=1000, hq=4, hkv=2, d=256, batch=2),
    Case("softcap_window_hd256", nq=1500, hq=4, hkv=2, d=256, wl=400, softcap=2.0),
    Case("s2_roll_hd192", nq=1500, hq=4, hkv=2, group=200, mode="longlora_roll", d=192),
    Case(
        "varlen_hd160", cu_q=[0, 300, 301, 1000], cu_k=[0, 400, 500, 1200], nq=0, hq=4, hkv=2, d=160
    ),
    Case(
        "key_padding_hd32",
        nq=500,
        batch=3,
        hq=2,
        hkv=2,
        causal=False,
        pad=[(0, 100), (130, 7), (0, 0)],
        d=32,
    ),
    Case("s2_leakfree_hd32", nq=2000, hq=4, hkv=4, group=256, mode="leakfree", d=32),
]

BAD_DTYPE_MSG = "float16 or bfloat16"
BAD_HEAD_DIM_MSG = "head_dim must be one of " + ", ".join(map(str, HEAD_DIMS)) + " on this device"
