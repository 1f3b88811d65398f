"""Every public function and module under ``torch.compile(fullgraph=True)`` with the default
(inductor) backend: forward and backward, compiled against eager (values and gradients, float32,
CPU).

A graph break fails the test (fullgraph). Modules run several optimizer steps so that state kept
between calls (rotated-weight cache, deltas patched into the base weight, trainable blocks living
in the base weight's storage) is exercised under compile. Inductor compiles are slow on small
machines: the kernels compile in this process (``TORCHINDUCTOR_COMPILE_THREADS`` overrides it) and
each case compiles once (``dynamic=False``).
"""

import copy
import os
import warnings

import pytest
import torch
from torch import nn

import longtune
from longtune.nn import (
    S2FTMLP,
    ChunkedLMHead,
    RotatedQuantLinear,
    S2Attention,
    S2FTLinear,
    SparseDeltaLinear,
    SparseQueryAttention,
)


def close(actual, expected, name=""):
    """float32 agreement up to rounding: 1e-5 relative to each element or to the tensor's largest
    entry (inductor fuses and reorders float32 arithmetic; its sin / cos / pow differ by an ulp)."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual,
        expected,
        rtol=1e-5,
        atol=1e-5 * scale,
        msg=(lambda m: f"{name}: {m}") if name else None,
    )


@pytest.fixture(autouse=True, scope="module")
def _compile_config():
    # several cases compile the same public function with other constant arguments: each is one
    # more entry of that function's code object, beyond dynamo's default limit of 8. The kernels
    # are tiny: compiling them in this process beats starting a pool of compile workers.
    threads = int(os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "1"))
    with (
        torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512),
        torch._inductor.config.patch(compile_threads=threads),
    ):
        yield


def _compile(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in ts]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _scalar(out, seed=1):
    """A loss with a fixed random cotangent (so the gradient is not a constant pattern)."""
    out = _first(out)
    if out.dim() == 0:
        return out * 1.7
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return (out * g).sum()


def check_fn(fn, *args, compiled=None, **kw):
    """fn(*args, **kw) eager vs compiled: outputs (all of a tuple) and the gradients of every
    floating argument. Returns the compiled callable so that cases with equal shapes can share
    it."""
    compiled = _compile(fn) if compiled is None else compiled
    ea, ca = _leaves(*args), _leaves(*args)
    out_e, out_c = fn(*ea, **kw), compiled(*ca, **kw)
    for oe, oc in zip(
        out_e if isinstance(out_e, tuple) else (out_e,),
        out_c if isinstance(out_c, tuple) else (out_c,),
    ):
        close(oc, oe)
    if _first(out_e).requires_grad:
        _scalar(out_e).backward()
        _scalar(out_c).backward()
        for a, e, c in zip(args, ea, ca):
            if a.is_floating_point():
                assert (e.grad is None) == (c.grad is None)
                if e.grad is not None:
                    close(c.grad, e.grad)
    return compiled


def check_module(make, inputs, *, steps=3, lr=0.1, between=None, train=True):
    """Two equal modules from ``make()``: one eager, one compiled. ``steps`` forward + backward +
    SGD steps on both with the same inputs, comparing outputs, input gradients and parameter
    gradients; ``between(module)`` edits both modules between steps (in place, as users do)."""
    eager, comp = make(), make()
    eager.train(train)
    comp.train(train)
    f = _compile(comp)
    for step in range(steps):
        ea, ca = _leaves(*inputs), _leaves(*inputs)
        out_e, out_c = eager(*ea), f(*ca)
        close(out_c, out_e)
        if not _first(out_e).requires_grad:
            continue
        _scalar(out_e, seed=step).backward()
        _scalar(out_c, seed=step).backward()
        for e, c in zip(ea, ca):
            if e.grad is not None or c.grad is not None:
                close(c.grad, e.grad)
        pe, pc = dict(eager.named_parameters()), dict(comp.named_parameters())
        assert pe.keys() == pc.keys()
        for name in pe:
            assert (pe[name].grad is None) == (pc[name].grad is None), name
            if pe[name].grad is not None:
                close(pc[name].grad, pe[name].grad, name)
        with torch.no_grad():
            for m in (eager, comp):
                for p in m.parameters():
                    if p.grad is not None:
                        p -= lr * p.grad
                        p.grad = None
                if between is not None:
                    between(m)
            # each step starts from equal parameters (rounding differences do not compound); an
            # in-place write, which the modules' state must notice like any other edit
            for name, p in comp.named_parameters():
                close(p, pe[name], name)
                p.copy_(pe[name])
    return eager, comp


# ------------------------------------------------------------------ sparse attention
def _qkv(b=2, n=24, hq=4, hkv=2, d=8, packed_total=None):
    g = torch.Generator().manual_seed(0)
    if packed_total is not None:
        return (
            torch.randn(packed_total, hq, d, generator=g),
            torch.randn(packed_total, hkv, d, generator=g),
            torch.randn(packed_total, hkv, d, generator=g),
        )
    return (
        torch.randn(b, n, hq, d, generator=g),
        torch.randn(b, n, hkv, d, generator=g),
        torch.randn(b, n, hkv, d, generator=g),
    )


ATTN_CASES = {
    "causal": dict(),
    "s2_leakfree": dict(s2_group_size=8),
    "s2_roll": dict(s2_group_size=8, s2_mode="longlora_roll"),
    "window_global": dict(window=6, n_global=2),
    "s2_window_noncausal": dict(causal=False, s2_group_size=8, window=(5, 3)),
}


@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_sparse_attention(name):
    kw = ATTN_CASES[name]
    check_fn(lambda q, k, v: longtune.sparse_attention(q, k, v, **kw), *_qkv())


def test_sparse_attention_padding_mask_and_lse():
    kpm = torch.ones(2, 24, dtype=torch.bool)
    kpm[1, 15:] = False
    kpm[0, :3] = False
    q, k, v = _qkv()
    f = check_fn(
        lambda q, k, v, m: longtune.sparse_attention(
            q, k, v, key_padding_mask=m, s2_group_size=8, return_lse=True
        ),
        q,
        k,
        v,
        kpm,
    )
    kpm2 = torch.ones_like(kpm)
    kpm2[0, 20:] = False
    check_fn(
        lambda q, k, v, m: longtune.sparse_attention(
            q, k, v, key_padding_mask=m, s2_group_size=8, return_lse=True
        ),
        q,
        k,
        v,
        kpm2,
        compiled=f,
    )


def test_sparse_attention_packed():
    cu = torch.tensor([0, 7, 20, 32], dtype=torch.int32)
    q, k, v = _qkv(packed_total=32)
    f = check_fn(
        lambda q, k, v, c: longtune.sparse_attention(
            q, k, v, cu_seqlens=c, max_seqlen=13, s2_group_size=4, return_lse=True
        ),
        q,
        k,
        v,
        cu,
    )
    # the offsets are data: other boundaries, same graph
    check_fn(
        lambda q, k, v, c: longtune.sparse_attention(
            q, k, v, cu_seqlens=c, max_seqlen=13, s2_group_size=4, return_lse=True
        ),
        q,
        k,
        v,
        torch.tensor([0, 13, 19, 32], dtype=torch.int32),
        compiled=f,
    )


# ------------------------------------------------------------------ fused linear + cross-entropy
def _lce_data(t=2 * 9, d=16, vocab=40, ignored=(3, 10)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, t // 2, d, generator=g)
    w = torch.randn(vocab, d, generator=g) * 0.5
    b = torch.randn(vocab, generator=g) * 0.1
    tgt = torch.randint(0, vocab, (2, t // 2), generator=g)
    for i in ignored:
        tgt.view(-1)[i] = -100
    return x, w, b, tgt


def test_linear_cross_entropy_mean_default():
    """The default reduction: the number of counted targets stays a tensor in the graph."""
    x, w, _, t = _lce_data()
    f = check_fn(lambda x, w, t: longtune.linear_cross_entropy(x, w, t), x, w, t)
    # every target ignored: 0 and zero gradients, like eager (which also warns)
    t_all = torch.full_like(t, -100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_fn(lambda x, w, t: longtune.linear_cross_entropy(x, w, t), x, w, t_all, compiled=f)
    xc, wc = _leaves(x, w)
    loss = f(xc, wc, t_all)
    loss.backward()
    assert loss.item() == 0.0 and not xc.grad.any() and not wc.grad.any()


LCE_CASES = {
    "sum_bias_smoothing_zloss_softcap": dict(
        reduction="sum", label_smoothing=0.1, z_loss=1e-3, softcap=4.0
    ),
    "mean_bias_smoothing": dict(label_smoothing=0.2),
    "none_bias_zloss": dict(reduction="none", z_loss=1e-2),
    "mean_filter": dict(filter_eps=1e-3, softcap=6.0),
}


@pytest.mark.parametrize("name", list(LCE_CASES))
def test_linear_cross_entropy_options(name):
    kw = LCE_CASES[name]
    check_fn(lambda x, w, b, t: longtune.linear_cross_entropy(x, w, t, b, **kw), *_lce_data())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_bool_rows(reduction):
    """A bool mask selects a data-dependent number of rows (an unbacked size in the graph; "none"
    returns that many); other masks reuse the graph."""
    x, w, b, t = _lce_data()
    rows = torch.zeros(t.shape, dtype=torch.bool)
    rows[0, 2:7] = rows[1, 4:] = True
    f = check_fn(
        lambda x, w, t, r: longtune.linear_cross_entropy(x, w, t, rows=r, reduction=reduction),
        x,
        w,
        t,
        rows,
    )
    rows2 = torch.zeros_like(rows)
    rows2[1, :3] = True
    check_fn(
        lambda x, w, t, r: longtune.linear_cross_entropy(x, w, t, rows=r, reduction=reduction),
        x,
        w,
        t,
        rows2,
        compiled=f,
    )


def test_linear_cross_entropy_index_rows():
    x, w, b, t = _lce_data()
    rows = torch.tensor([1, 2, 5, 8, 9, 17])
    for reduction in ("none", "mean"):
        check_fn(
            lambda x, w, t, b, r: longtune.linear_cross_entropy(
                x, w, t, b, rows=r, reduction=reduction
            ),
            x,
            w,
            t,
            b,
            rows,
        )


def test_dynamic_shapes():
    """dynamic=True: the sequence length and the token count are symbols of one graph."""

    def attn(q, k, v):
        return longtune.sparse_attention(q, k, v, s2_group_size=8, window=10)

    def ce(x, w, t):
        return longtune.linear_cross_entropy(x, w, t, label_smoothing=0.1)

    fa = torch.compile(attn, fullgraph=True, dynamic=True)
    fc = torch.compile(ce, fullgraph=True, dynamic=True)
    for n in (10, 17):
        check_fn(attn, *_qkv(n=2 * n), compiled=fa)
        x, w, _, t = _lce_data(t=2 * n)
        check_fn(ce, x, w, t, compiled=fc)


# ------------------------------------------------------------------ Hadamard / quantization
def test_hadamard_transform():
    g = torch.Generator().manual_seed(0)
    check_fn(
        lambda x: longtune.hadamard_transform(x) + longtune.hadamard_transform(x, scale=0.5) ** 2,
        torch.randn(3, 5, 48, generator=g),
    )  # 48 = 12 * 2^2


def test_hadamard_matrix():
    """A constant of n: built once while tracing, embedded in the graph."""
    g = torch.Generator().manual_seed(0)
    check_fn(
        lambda x: (
            x @ longtune.hadamard_matrix(x.shape[-1], normalized=True)
            + x @ longtune.hadamard_matrix(20)
        ),
        torch.randn(3, 20, generator=g),
    )


def test_rotate_fake_quant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 64, generator=g)
    check_fn(
        lambda x: (
            longtune.rotate_fake_quant(x, bits=4)
            + longtune.rotate_fake_quant(
                x,
                bits=3,
                granularity="per_group",
                group_size=16,
                symmetric=False,
                clip_ratio=0.9,
                hadamard_size=32,
                ste="clip",
            )
        ),
        x,
    )


def test_quantize_dequantize_quantize_weight():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    w = torch.randn(24, 64, generator=g)

    def fn(x, w):
        codes, scales, zeros = longtune.quantize(
            x, bits=4, granularity="per_group", group_size=16, symmetric=False
        )
        xq = longtune.dequantize(codes, scales, zeros)
        return xq * x + longtune.quantize_weight(w, bits=4, group_size=32).sum(0)

    check_fn(fn, x, w)

    def codes(x):
        return longtune.quantize(x, bits=8, clip_ratio=0.95)

    f = check_fn(codes, x)
    xg = x.clone().requires_grad_()
    for out in (*codes(xg), *f(xg)):  # codes, scales, zeros: constants, eager and compiled
        assert not out.requires_grad


# ------------------------------------------------------------------ modules
def test_s2attention_train_eval_packed():
    cu = torch.tensor([0, 9, 30])
    q, k, v = _qkv(packed_total=30)

    class Packed(nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.core, self.max_seqlen = S2Attention(**kw), kw.pop("max_seqlen", None)

        def forward(self, q, k, v):
            return self.core(q, k, v, cu_seqlens=cu, max_seqlen=self.max_seqlen)

    # a fixed group size needs nothing from the offsets; a ratio takes max_seqlen
    check_module(lambda: Packed(group_size=6), (q, k, v), steps=1)
    check_module(lambda: Packed(group_size_ratio=0.25), (q, k, v), steps=1, train=False)
    m = S2Attention(group_size_ratio=0.25).train()
    out = _compile(lambda q, k, v: m(q, k, v, cu_seqlens=cu, max_seqlen=21))(q, k, v)
    close(out, m(q, k, v, cu_seqlens=cu))  # eager: G from the longest sequence in the offsets
    # without max_seqlen the group size would come from data: a clear error, not a wrong graph
    with pytest.raises(Exception, match="pass max_seqlen"):
        _compile(lambda q, k, v: m(q, k, v, cu_seqlens=cu))(q, k, v)


def test_s2attention_padded_batch():
    kpm = torch.ones(2, 24, dtype=torch.bool)
    kpm[1, :5] = False

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.core = S2Attention(group_size_ratio=0.5, mode="longlora_roll")

        def forward(self, q, k, v):
            return self.core(q, k, v, key_padding_mask=kpm)

    check_module(Padded, _qkv(), steps=1)


def test_sparse_query_attention():
    def make():
        torch.manual_seed(3)
        return SparseQueryAttention.sqa(32, 8, s2_group_size=8, window=12, n_global=1)

    x = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(0))
    check_module(make, (x,), steps=2)


def test_chunked_lm_head():
    def make():
        torch.manual_seed(4)
        return ChunkedLMHead(nn.Linear(16, 40), label_smoothing=0.1, softcap=5.0)

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 10, 16, generator=g)
    labels = torch.randint(0, 40, (2, 10), generator=g)
    labels[0, :4] = -100

    class WithLabels(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = make()

        def forward(self, h):
            return self.head(h, labels)

    check_module(WithLabels, (h,), steps=2)
    check_module(make, (h,), steps=1)  # logits


def test_rotated_quant_linear_trainable():
    def make():
        torch.manual_seed(5)
        return RotatedQuantLinear(32, 24, weight_group_size=16, act_clip_ratio=0.9)

    check_module(
        make, (torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(0)),), steps=2
    )


def test_rotated_quant_linear_frozen_weight_edited_between_calls():
    """Frozen weight: eager caches the rotated weight; under compile it is rotated in the graph,
    and in-place edits of the weight (optimizer-free, e.g. a merged adapter) are seen."""

    def make():
        torch.manual_seed(6)
        m = RotatedQuantLinear(32, 24, hadamard_size=16, weight_bits=8)
        m.weight.requires_grad_(False)
        return m

    def edit(m):
        m.weight.data[::3] += 0.25  # .data: not seen by the version counter

    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    check_module(make, (x,), steps=3, between=edit)


def test_sparse_delta_linear_optimizer_steps():
    """The deltas change every step: each call must see the current ones (eager patches the base
    weight when a snapshot differs; a graph patches the k entries on every call)."""

    def make():
        torch.manual_seed(7)
        return SparseDeltaLinear(nn.Linear(32, 24), density=0.1, seed=0)

    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    eager, comp = check_module(make, (x,), steps=3, lr=0.5)
    assert eager.values.abs().sum() > 0
    for key, val in eager.state_dict().items():
        close(comp.state_dict()[key], val, key)
    # an edit outside the optimizer, then eager and compiled again
    for m in (eager, comp):
        with torch.no_grad():
            m.values.mul_(-2)
    check_fn(eager, x, compiled=_compile(comp))


@pytest.mark.parametrize("dim", ["out", "in"])
def test_s2ft_linear(dim):
    def make():
        torch.manual_seed(8)
        return S2FTLinear(nn.Linear(32, 24), 4, 12, dim=dim)

    eager, comp = check_module(
        make, (torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(0)),), steps=2
    )
    close(comp.base.weight, eager.base.weight)  # the block is updated in place, in both
    assert not torch.equal(eager.part.detach(), eager.original_part)


class _MLP(nn.Module):
    def __init__(self, d=32, inter=48, n=16):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=False).requires_grad_(False)
        self.up_proj = S2FTLinear(nn.Linear(d, inter, bias=False), 0, n, dim="out")
        self.down_proj = S2FTLinear(nn.Linear(inter, d, bias=False), 0, n, dim="in")
        self.act_fn = nn.SiLU()


@pytest.mark.parametrize("input_grad", [True, False], ids=["x_grad", "x_frozen"])
def test_s2ft_mlp(input_grad):
    def make():
        torch.manual_seed(9)
        return S2FTMLP(_MLP())

    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    if input_grad:
        check_module(make, (x,), steps=2)
    else:  # the frozen-input path (in-place activation, channel slice saved)

        class Frozen(nn.Module):
            def __init__(self):
                super().__init__()
                self.mlp = make()

            def forward(self, x):
                return self.mlp(x.detach())

        check_module(Frozen, (x,), steps=2)


# ------------------------------------------------------------------ a Hugging Face model, patched
def test_hf_llama_patched_training_step():
    """A training step of a tiny Llama patched with S^2-Attn and the fused CE head: the whole model
    (transformers' decoder, rotary, masks, longtune attention and loss) compiles as one graph and
    the loss and every gradient equal eager."""
    transformers = pytest.importorskip("transformers")

    def make():
        torch.manual_seed(10)
        cfg = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
        m = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").float()
        longtune.patch(m, attention="s2", group_size=16)
        longtune.patch(m, lm_head="fused_ce")
        return m.train()

    eager, comp = make(), make()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 40), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100
    f = torch.compile(comp, fullgraph=True, dynamic=False)
    loss_e = eager(input_ids=ids, labels=labels).loss
    loss_c = f(input_ids=ids, labels=labels).loss
    close(loss_c, loss_e)
    loss_e.backward()
    loss_c.backward()
    pe, pc = dict(eager.named_parameters()), dict(comp.named_parameters())
    assert pe.keys() == pc.keys()
    for name in pe:
        assert pe[name].grad is not None, name
        close(pc[name].grad, pe[name].grad, name)
    # the patch really is in the graph: S^2 groups differ from dense causal attention
    dense = copy.deepcopy(eager).eval()
    with torch.no_grad():
        assert not torch.allclose(dense(input_ids=ids, labels=labels).loss, loss_e)
