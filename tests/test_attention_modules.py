"""S2Attention and SparseQueryAttention modules."""

import pytest
import torch

import longtune
from longtune.nn import S2Attention, SparseQueryAttention
from longtune.nn.attention import apply_rotary, s2_group_size
from longtune.reference import attention as ref

from .attention_cases import make_qkv


def test_s2attention_trains_sparse_and_infers_dense():
    q, k, v = make_qkv(2, 64, 64, 4, 2, 16, torch.float64)
    m = S2Attention()  # G = N/4 = 16
    m.train()
    torch.testing.assert_close(
        m(q, k, v), ref.sparse_attention(q, k, v, s2_group_size=16), rtol=1e-10, atol=1e-10
    )
    m.eval()
    torch.testing.assert_close(m(q, k, v), ref.sparse_attention(q, k, v), rtol=1e-10, atol=1e-10)
    m2 = S2Attention(s2_in_eval=True, mode="longlora_roll", group_size_ratio=0.5).eval()
    torch.testing.assert_close(
        m2(q, k, v),
        ref.sparse_attention(q, k, v, s2_group_size=32, s2_mode="longlora_roll"),
        rtol=1e-10,
        atol=1e-10,
    )


def test_s2attention_group_size_rounding_and_padding():
    assert (
        s2_group_size(100, 0.25) == 24
        and s2_group_size(6, 0.25) == 2
        and s2_group_size(30, 0.25) == 6
    )
    q, k, v = make_qkv(3, 30, 30, 2, 2, 8, torch.float64)
    kpm = torch.ones(3, 30, dtype=torch.bool)
    kpm[1, :7] = False
    kpm[2, :20] = False
    out = S2Attention().train()(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(
        out,
        ref.sparse_attention(q, k, v, s2_group_size=6, key_padding_mask=kpm),
        rtol=1e-10,
        atol=1e-10,
    )
    with pytest.raises(ValueError, match="group_size_ratio"):
        S2Attention(group_size_ratio=0)
    with pytest.raises(ValueError, match="mode"):
        S2Attention(mode="roll")


def test_s2_rule_is_one_function():
    # S2Attention and longtune.patch(attention="s2") share LongLoRA's train / eval rule and checks
    from longtune.nn.attention import check_s2_options, s2_mask

    rule = dict(s2_in_eval=False, mode="leakfree", group_size=None, group_size_ratio=0.25)
    assert s2_mask(training=True, seqlen=100, **rule) == longtune.AttentionMask(s2_group_size=24)
    assert (
        s2_mask(training=False, seqlen=lambda: 1 / 0, **rule) == longtune.AttentionMask()
    )  # seqlen not read
    assert (
        s2_mask(
            training=False, seqlen=100, **dict(rule, s2_in_eval=True, group_size=8)
        ).s2_group_size
        == 8
    )
    with pytest.raises(ValueError, match="X: .*s2_mode must be one of"):
        check_s2_options("X", 0.25, "roll")
    with pytest.raises(ValueError, match="even number"):
        S2Attention(group_size=5)


def test_s2attention_packed():
    q, k, v = make_qkv(1, 40, 40, 2, 2, 8, torch.float64, packed=True)
    cu = torch.tensor([0, 16, 40])
    out = S2Attention().train()(q, k, v, cu_seqlens=cu)  # G from the longest sequence (24) -> 6
    torch.testing.assert_close(
        out, ref.sparse_attention(q, k, v, cu_seqlens=cu, s2_group_size=6), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize(
    "variant,hq,hkv",
    [
        ("mha", 8, 8),
        ("gqa", 8, 2),
        ("mqa", 8, 1),
        ("sqa", 4, 2),
        ("ssqa", 4, 4),
        ("xsqa", 2, 2),
        ("xsmqa", 2, 1),
        ("rsqa", 2, 4),
    ],
)
def test_sqa_variants_shapes_and_reference(variant, hq, hkv):
    torch.manual_seed(0)
    m = SparseQueryAttention.from_variant(variant, 64, 8, dtype=torch.float64)
    assert (m.num_query_heads, m.num_kv_heads) == (hq, hkv)
    assert m.o_proj.in_features == max(hq, hkv) * 8
    x = torch.randn(2, 21, 64, dtype=torch.float64, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    # the same block written with the reference attention
    b, n = 2, 21
    q = apply_rotary(m.q_proj(x).view(b, n, hq, 8), torch.arange(n))
    k = apply_rotary(m.k_proj(x).view(b, n, hkv, 8), torch.arange(n))
    v = m.v_proj(x).view(b, n, hkv, 8)
    want = m.o_proj(ref.sparse_attention(q, k, v).reshape(b, n, -1))
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (wx,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx, wx, rtol=1e-9, atol=1e-9)


def test_sqa_factories_and_masks():
    assert SparseQueryAttention.sqa(64, 8).num_query_heads == 4
    assert SparseQueryAttention.xsqa(64, 16, num_query_heads=2).num_query_heads == 2
    assert SparseQueryAttention.rsqa(64, 8).num_kv_heads == 4
    torch.manual_seed(0)
    m = SparseQueryAttention(
        32, 4, 2, 1, s2_group_size=8, window=6, n_global=2, dtype=torch.float64
    )
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 20:] += 1
    torch.testing.assert_close(
        m(x)[:, :20], m(x2)[:, :20], rtol=0, atol=0
    )  # causal: no leak from the future


def test_sqa_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        SparseQueryAttention(30, 4, 2, 2)
    with pytest.raises(ValueError, match="divide one another"):
        SparseQueryAttention(64, 8, 3, 2)
    with pytest.raises(ValueError, match="unknown SQA variant"):
        SparseQueryAttention.from_variant("foo", 64, 8)
    with pytest.raises(ValueError, match="<= H/4"):
        SparseQueryAttention.xsqa(64, 8, num_query_heads=4)
    with pytest.raises(ValueError, match=r"x must be \(batch, seqlen, 64\)"):
        SparseQueryAttention.sqa(64, 8)(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="even head_dim"):
        SparseQueryAttention(60, 4, 2, 2, head_dim=15)


def test_modules_pass_softcap():
    q, k, v = make_qkv(2, 32, 32, 4, 2, 16, torch.float64)
    m = S2Attention(group_size=8, softcap=1.5).train()
    torch.testing.assert_close(
        m(q, k, v),
        ref.sparse_attention(q, k, v, s2_group_size=8, softcap=1.5),
        rtol=1e-10,
        atol=1e-10,
    )
    torch.testing.assert_close(
        m.eval()(q, k, v), ref.sparse_attention(q, k, v, softcap=1.5), rtol=1e-10, atol=1e-10
    )
    assert "softcap=1.5" in repr(m)
    with pytest.raises(ValueError, match="softcap"):
        S2Attention(softcap=-1.0)
    torch.manual_seed(0)
    blk = SparseQueryAttention(32, 4, 2, 1, softcap=0.5, rotary=False).double()
    plain = SparseQueryAttention(32, 4, 2, 1, rotary=False).double()
    plain.load_state_dict(blk.state_dict())
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    b, n = 2, 12
    qq = blk.q_proj(x).view(b, n, 2, 8)
    kk = blk.k_proj(x).view(b, n, 1, 8)
    vv = blk.v_proj(x).view(b, n, 1, 8)
    want = blk.o_proj(ref.sparse_attention(qq, kk, vv, softcap=0.5).reshape(b, n, 16))
    torch.testing.assert_close(blk(x), want, rtol=1e-10, atol=1e-10)
    assert (blk(x) - plain(x)).abs().max() > 1e-6
    with pytest.raises(ValueError, match="softcap"):
        SparseQueryAttention(32, 4, 2, 1, softcap=-2.0)


def test_causal_lm_loss_is_chunked_lm_heads():
    from longtune.nn import ChunkedLMHead
    from longtune.nn.cross_entropy import causal_lm_loss

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50)
    h = torch.randn(2, 9, 16, generator=g)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[0, 3] = -100
    want = torch.nn.functional.cross_entropy(
        (h[:, :-1] @ head.weight.T + head.bias).reshape(-1, 50),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )
    torch.testing.assert_close(causal_lm_loss(h, head.weight, labels, head.bias), want)
    torch.testing.assert_close(ChunkedLMHead(head)(h, labels), want)
    # already aligned targets (transformers' shift_labels): no shift inside
    torch.testing.assert_close(
        causal_lm_loss(h[:, :-1], head.weight, labels[:, 1:], head.bias, shift=False), want
    )
