"""The sparse-attention CUDA kernels on a real GPU (skipped without one): the emulated tests' cases
plus larger shapes against the float64 reference (2x rule), and torch.library.opcheck."""

import math

import pytest
import torch

from longtune import AttentionMask

from .. import attn_device_cases as C

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
OPS = torch.ops.longtune


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", C.CASES + C.GPU_CASES, ids=str)
def test_forward_backward(case, dtype):
    C.check_case(OPS.sparse_attention_fwd, OPS.sparse_attention_bwd, "cuda", case, dtype)


def test_errors():
    q = torch.randn(1, 8, 1, 64, device="cuda")
    with pytest.raises(RuntimeError, match=C.BAD_DTYPE_MSG):
        OPS.sparse_attention_fwd(q, q, q, None, None, None, 0, 0, 0.125, AttentionMask().to_list())
    q = torch.randn(1, 8, 1, 72, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match=C.BAD_HEAD_DIM_MSG):
        OPS.sparse_attention_fwd(q, q, q, None, None, None, 0, 0, 0.125, AttentionMask().to_list())


def test_query_chunk_equals_tail_rows():
    # a long sequence: its last 1024 query rows computed alone (explicit q_offset, all keys) give
    # bit-identical rows (same key tiles, same order)
    q = torch.randn(1, 8192, 16, 64, device="cuda", dtype=torch.bfloat16)
    args = (None, None, None, 0, 0, 0.125, AttentionMask(window_left=256).to_list())
    out, lse = OPS.sparse_attention_fwd(q, q, q, *args)
    tail = q[:, -1024:].contiguous()
    targs = (
        None,
        None,
        None,
        0,
        0,
        0.125,
        AttentionMask(window_left=256, q_offset=8192 - 1024).to_list(),
    )
    o2, l2 = OPS.sparse_attention_fwd(tail, q, q, *targs)
    torch.testing.assert_close(out[:, -1024:], o2, rtol=0, atol=0)
    torch.testing.assert_close(lse[:, :, -1024:], l2, rtol=0, atol=0)


def _has_fake(op):
    try:
        from torch._library.simple_registry import singleton

        return singleton.find(f"longtune::{op}").fake_impl.kernel is not None
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.parametrize("varlen", [False, True])
def test_opcheck(varlen):
    import longtune.ops  # noqa: F401  (fake kernels, if registered)

    d = 64
    if varlen:
        q = torch.randn(50, 2, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(60, 1, d, device="cuda", dtype=torch.bfloat16)
        cq = torch.tensor([0, 20, 50], device="cuda")
        ck = torch.tensor([0, 30, 60], device="cuda")
        mask = (None, cq, ck, 30, 30)
    else:
        q = torch.randn(2, 50, 2, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(2, 60, 1, d, device="cuda", dtype=torch.bfloat16)
        mask = (torch.rand(2, 60, device="cuda") > 0.2, None, None, 0, 0)
    rest = (1.0 / math.sqrt(d), AttentionMask(s2_group_size=16, s2_mode="leakfree").to_list())
    utils = None if _has_fake("sparse_attention_fwd") else ("test_schema",)
    kw = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(OPS.sparse_attention_fwd.default, (q, k, k) + mask + rest, **kw)
    out, lse = OPS.sparse_attention_fwd(q, k, k, *mask, *rest)
    utils = None if _has_fake("sparse_attention_bwd") else ("test_schema",)
    kw = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(
        OPS.sparse_attention_bwd.default,
        (torch.randn_like(out), q, k, k, out, lse) + mask + rest,
        **kw,
    )
