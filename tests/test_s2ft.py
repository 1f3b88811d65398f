"""S²FT: partial-backprop layer gradients vs dense autograd, in-place block updates, gradient
accumulation, and head / channel selection with co-permutation on tiny Llama / Qwen2 (GQA)."""

import copy

import pytest
import torch

import longtune
from longtune.nn import S2FTMLP, S2FTLinear
from longtune.nn.s2ft import _S2FTMLPFn
from longtune.train.s2ft import select_and_permute


@pytest.mark.parametrize("dim,lo,hi", [("out", 2, 5), ("in", 0, 3), ("in", 4, 9), ("out", 0, 7)])
def test_partial_backprop_matches_dense(dim, lo, hi):
    torch.manual_seed(0)
    lin = torch.nn.Linear(9, 7).double()
    ref = copy.deepcopy(lin)
    m = S2FTLinear(lin, lo, hi, dim)
    x = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(2, 5, 7, dtype=torch.float64)
    m(x).backward(g)
    ref(x2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    blk = ref.weight.grad[lo:hi] if dim == "out" else ref.weight.grad[:, lo:hi]
    torch.testing.assert_close(m.part.grad, blk)
    assert lin.weight.grad is None and lin.bias.grad is None


def test_gradcheck_and_accumulation_and_in_place_update():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4).double()
    m = S2FTLinear(lin, 1, 4, "in")
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, p: longtune.nn.s2ft._S2FTFn.apply(a, p, lin.weight, lin.bias, 1, 4, "in"),
        (x, m.part),
    )
    a, b = torch.randn(3, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    m(a).sum().backward()
    m(b).sum().backward()  # micro-batches accumulate (the official code overwrote)
    full = (
        torch.ones(3, 4, dtype=torch.float64).T @ a + torch.ones(5, 4, dtype=torch.float64).T @ b
    )[:, 1:4]
    torch.testing.assert_close(m.part.grad, full)
    w_before = lin.weight.detach().clone()
    torch.optim.SGD([m.part], lr=0.1).step()
    assert torch.equal(lin.weight[:, 0], w_before[:, 0]) and torch.equal(
        lin.weight[:, 4:], w_before[:, 4:]
    )
    assert not torch.equal(
        lin.weight[:, 1:4], w_before[:, 1:4]
    )  # updated in place, in the layer's weight


def test_bad_input():
    with pytest.raises(ValueError, match=r"trainable block \[3, 3\) must be a non-empty range"):
        S2FTLinear(torch.nn.Linear(4, 4), 3, 3)
    with pytest.raises(ValueError, match="dim must be 'out'"):
        S2FTLinear(torch.nn.Linear(4, 4), 0, 1, "rows")
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        S2FTLinear(torch.nn.Conv1d(4, 4, 1), 0, 1)


transformers = pytest.importorskip("transformers")


def _tiny(kind, kv_heads):
    torch.manual_seed(0)
    Cfg, Model = (
        (transformers.LlamaConfig, transformers.LlamaForCausalLM)
        if kind == "llama"
        else (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)
    )
    cfg = Cfg(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    return Model(cfg).double().eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_permuted_model_computes_the_same_function(kind, kv_heads):
    m = _tiny(kind, kv_heads)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = m(ids).logits
    picks = select_and_permute(m, head_ratio=0.5, channel_ratio=0.1, seed=1)
    torch.testing.assert_close(m(ids).logits, ref, rtol=0, atol=1e-12)
    assert (
        len(picks[0]["kv_heads"]) == max(1, round(0.5 * kv_heads))
        and len(picks[0]["channels"]) == 10
    )
    trainable = sorted({n.split(".")[-2] for n, p in m.named_parameters() if p.requires_grad})
    assert trainable == ["down_proj", "o_proj", "up_proj", "v_proj"]


def test_s2ft_training_lowers_the_loss():
    m = _tiny("llama", 2).float().train()
    select_and_permute(m, head_ratio=0.5, channel_ratio=0.2, seed=0)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(10):
        loss = m(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_fuse_unfuse_adapter():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    w0 = lin.weight.detach().clone()
    m = S2FTLinear(lin, 1, 3, "out")
    with torch.no_grad():
        m.part.add_(torch.randn_like(m.part))
    x = torch.randn(4, 6)
    y_trained = m(x)
    delta = m.unfuse()
    torch.testing.assert_close(lin.weight, w0)
    m.fuse(delta)
    torch.testing.assert_close(m(x), y_trained)
    with pytest.raises(ValueError, match="adapter shape"):
        m.fuse(torch.zeros(3, 6))


class _GatedMLP(torch.nn.Module):
    def __init__(self, d=12, inter=20, act=None):
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, inter, bias=False)
        self.up_proj = torch.nn.Linear(d, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, d, bias=False)
        self.act_fn = act or torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _s2_mlp(n, seed=0):
    torch.manual_seed(seed)
    m = _GatedMLP().double().requires_grad_(False)
    m.up_proj = S2FTLinear(m.up_proj, 0, n, "out")
    m.down_proj = S2FTLinear(m.down_proj, 0, n, "in")
    return m


@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("n", [1, 5, 20])
def test_fused_mlp_matches_the_module_composition(x_grad, n):
    ref = _s2_mlp(n)
    fused = S2FTMLP(_s2_mlp(n))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 12, generator=g, dtype=torch.float64)
    gy = torch.randn(2, 7, 12, generator=g, dtype=torch.float64)
    outs = []
    for m in (ref, fused):
        xi = x.clone().requires_grad_(x_grad)
        for _ in range(2):  # two micro-batches: gradients accumulate
            y = m(xi)
            y.backward(gy)
        outs.append((y.detach(), m.up_proj.part.grad, m.down_proj.part.grad, xi.grad))
    for a, b in zip(*outs):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (outs[1][3] is not None) == x_grad


def test_fused_mlp_gradcheck_and_saves_only_the_block():
    m = S2FTMLP(_s2_mlp(3))
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, u, d: _S2FTMLPFn.apply(
            x, u, d, m.gate_proj.weight, m.up_proj.base.weight, m.down_proj.base.weight, 3
        ),
        (x, m.up_proj.part, m.down_proj.part),
    )
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        m(torch.randn(5, 12, dtype=torch.float64))
    # frozen input: x plus two (tokens x n) slices, never a tokens x intermediate tensor
    assert all(s[-1] in (12, 3) or s == m.down_proj.base.weight.shape for s in saved), saved


def test_fused_mlp_bad_input():
    m = _s2_mlp(3)
    m.down_proj = S2FTLinear(m.down_proj.base, 1, 4, "in")
    with pytest.raises(ValueError, match="same n"):
        S2FTMLP(m)
    with pytest.raises(TypeError, match="S2FTLinear"):
        S2FTMLP(_GatedMLP())
    g = _s2_mlp(3)
    g.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match="SiLU"):
        S2FTMLP(g)
    t = _s2_mlp(3)
    t.gate_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        S2FTMLP(t)


def test_select_and_permute_fuses_the_mlps():
    m = _tiny("llama", 2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = m(ids).logits
    keys = set(m.state_dict())
    select_and_permute(m, head_ratio=0.5, channel_ratio=0.1, seed=1)
    assert all(isinstance(layer.mlp, S2FTMLP) for layer in m.model.layers)
    torch.testing.assert_close(m(ids).logits, ref, rtol=0, atol=1e-12)
    assert {k.replace(".base.", ".") for k in m.state_dict()} >= keys
    m2 = _tiny("llama", 2)
    select_and_permute(m2, head_ratio=0.5, channel_ratio=0.1, seed=1, fuse_mlp=False)
    assert not any(isinstance(layer.mlp, S2FTMLP) for layer in m2.model.layers)
