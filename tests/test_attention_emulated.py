"""The sparse-attention CUDA kernels' device code (forward and backward), run on the CPU emulator,
against the float64 reference (error <= 2x the PyTorch reference's in the same dtype)."""

import math
import re

import pytest
import torch

from longtune import AttentionMask
from longtune.reference.attention import sparse_attention
from longtune.testing import emulated

from . import attn_device_cases as C

FWD = emulated("sparse_attention_fwd")
BWD = emulated("sparse_attention_bwd")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", C.CASES, ids=str)
def test_forward_backward(case, dtype):
    C.check_case(FWD, BWD, "cpu", case, dtype)


def _args(d=64, softcap=0.0, **mask):
    return (None, None, None, 0, 0, 1.0 / math.sqrt(d), AttentionMask(**mask).to_list(), softcap)


def test_rejects_float32():
    q = torch.randn(1, 8, 1, 64)
    with pytest.raises(RuntimeError, match=r"sparse_attention_fwd: q must be float16 or bfloat16"):
        FWD(q, q, q, *_args())
    with pytest.raises(RuntimeError, match=r"sparse_attention_bwd: q must be float16 or bfloat16"):
        BWD(q, q, q, q, q, torch.zeros(1, 1, 8), *_args())


def test_head_dim_list():
    assert C.HEAD_DIMS == (32, 64, 80, 96, 128, 160, 192, 256)


@pytest.mark.parametrize("d", [16, 48, 72, 512])
def test_rejects_unsupported_head_dim(d):
    # refused with the list (never computed with another head dim's kernel), forward and backward
    q = torch.randn(1, 8, 1, d, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=re.escape(C.BAD_HEAD_DIM_MSG + f", got {d}")):
        FWD(q, q, q, *_args(d))
    with pytest.raises(RuntimeError, match=re.escape(C.BAD_HEAD_DIM_MSG + f", got {d}")):
        BWD(q, q, q, q, q, torch.zeros(1, 1, 8), *_args(d))


def test_shared_checks_name_the_argument():
    q = torch.randn(1, 8, 2, 64, dtype=torch.float16)
    k = torch.randn(1, 8, 3, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="query heads"):
        FWD(q, k, k, *_args())
    with pytest.raises(RuntimeError, match="s2_group_size must be an even number"):
        FWD(q, q, q, None, None, None, 0, 0, 0.125, [1, 1, 3, 1, -1, -1, 0, -1, 0, 0, 0])


def test_empty_inputs():
    for shape_q, shape_k in [
        ((0, 8, 1, 64), (0, 8, 1, 64)),
        ((2, 0, 1, 64), (2, 5, 1, 64)),
        ((2, 5, 1, 64), (2, 0, 1, 64)),
    ]:
        q = torch.randn(shape_q, dtype=torch.bfloat16)
        k = torch.randn(shape_k, dtype=torch.bfloat16)
        out, lse = FWD(q, k, k, *_args())
        assert out.shape == (shape_q[0], shape_q[1], 1, 64) and lse.shape == (
            shape_q[0],
            1,
            shape_q[1],
        )
        assert (out == 0).all() and (lse == -math.inf).all()
        dq, dk, dv = BWD(out, q, k, k, out, lse, *_args())
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
        assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def test_non_contiguous_and_misaligned_inputs():
    # q from a transposed buffer (head stride > token stride) and k/v at an odd element offset:
    # the device op copies what the 16-byte cp.async rows cannot read directly
    c = C.Case("strided", nq=40, hq=2, hkv=2)
    q = torch.randn(1, 2, 40, 64, dtype=torch.float16).transpose(1, 2)
    buf = torch.randn(1 * 40 * 2 * 64 + 1, dtype=torch.float16)
    k = buf[1:].view(1, 40, 2, 64)
    v = torch.randn(1, 40, 2, 64, dtype=torch.float16)
    args = C._op_args(c, None, "cpu")
    out, lse = FWD(q, k, v, *args)
    ref, ref_lse = FWD(q.contiguous(), k.clone(), v, *args)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


def test_query_chunk_equals_tail_rows():
    # the last 64 query rows computed alone (explicit q_offset, all keys): bit-identical rows
    q = torch.randn(1, 200, 1, 64, dtype=torch.bfloat16)
    out, lse = FWD(q, q, q, *_args(window_left=50))
    o2, l2 = FWD(q[:, -72:].contiguous(), q, q, *_args(window_left=50, q_offset=128))
    assert torch.equal(out[:, -72:], o2) and torch.equal(lse[:, :, -72:], l2)


@pytest.mark.parametrize("d", C.NEW_SHAPE_HEAD_DIMS)
def test_nonfinite_value_in_partial_tile(d):
    # a NaN in one value element inside a causally partial key tile: the forward's per-row slow
    # path (where Q stays in shared memory, d >= 160, P goes through its own shared tile) keeps it to
    # the rows that see that key, in that column
    g = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(1, 80, 1, d, generator=g).to(torch.bfloat16) for _ in range(3))
    v[0, 30, 0, 7] = float("nan")
    out, lse = FWD(q, k, v, *_args(d))
    assert torch.isnan(out[0, 30:, 0, 7]).all()
    bad = torch.zeros_like(out, dtype=torch.bool)
    bad[0, 30:, 0, 7] = True
    assert torch.isfinite(out[~bad]).all() and torch.isfinite(lse).all()
    q6, k6, v6 = (t.double() for t in (q, k, v))
    v6[0, 30, 0, 7] = 0.0
    ref = sparse_attention(q6, k6, v6, causal=True, softmax_scale=1.0 / math.sqrt(d))
    ok = ~bad
    torch.testing.assert_close(out[ok].double(), ref[ok], atol=2e-2, rtol=2e-2)
