"""SpIEL core: the gather-only delta gradient (CPU kernel and the emulated CUDA kernel) against the
dense-then-gather reference, and SparseDeltaLinear's forward / backward / merge / save-load."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longtune
from longtune.reference import sparse_delta as R
from longtune.testing import assert_within_2x, emulator_grid_cap

OPS = [
    pytest.param(torch.ops.longtune.sparse_delta_grad, id="cpu"),
    pytest.param(torch.ops.longtune_emu.sparse_delta_grad, id="emulated-cuda"),
]


def _case(T, out, inp, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(T, out, generator=g).to(dtype)
    x = torch.randn(T, inp, generator=g).to(dtype)
    idx = torch.randperm(out * inp, generator=g)[:k].sort().values
    return gy, x, idx


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "T,out,inp,k", [(37, 24, 40, 50), (64, 16, 16, 256), (5, 7, 3, 1), (128, 33, 17, 0)]
)
def test_grad_matches_dense_then_gather(op, dtype, T, out, inp, k):
    gy, x, idx = _case(T, out, inp, k, dtype)
    got = op(gy, x, idx, inp)
    ref = R.sparse_delta_grad(gy, x, idx, inp, torch.float64)
    same = (gy.T @ x).reshape(-1)[idx]  # PyTorch in the same dtype
    assert got.dtype == dtype and got.shape == (k,)
    assert_within_2x(got, ref.double(), same, f"T={T} k={k} {dtype}")


def test_full_density_and_leading_dims():
    gy, x, _ = _case(6, 5, 4, 0, torch.float64)
    idx = torch.arange(20)
    got = torch.ops.longtune.sparse_delta_grad(gy.reshape(2, 3, 5), x.reshape(2, 3, 4), idx, 4)
    torch.testing.assert_close(got, (gy.T @ x).reshape(-1))


def test_gradcheck_and_opcheck():
    gy, x, idx = _case(6, 5, 4, 7, torch.float64)
    f = lambda a, b: torch.ops.longtune.sparse_delta_grad(a, b, idx, 4)  # noqa: E731  (bilinear: exact)
    torch.testing.assert_close(f(gy, x), R.sparse_delta_grad(gy, x, idx, 4))
    torch.library.opcheck(
        torch.ops.longtune.sparse_delta_grad.default,
        (gy.float(), x.float(), idx, 4),
        test_utils=("test_schema", "test_faketensor"),
    )


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 40), out=st.integers(1, 20), inp=st.integers(1, 20), frac=st.floats(0, 1))
def test_random_shapes(T, out, inp, frac):
    k = int(frac * out * inp)
    gy, x, idx = _case(T, out, inp, k, torch.float64, seed=T * 1000 + out * 10 + inp)
    torch.testing.assert_close(
        torch.ops.longtune.sparse_delta_grad(gy, x, idx, inp), R.sparse_delta_grad(gy, x, idx, inp)
    )


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(1, 300),
    out=st.integers(1, 70),
    inp=st.integers(1, 70),
    frac=st.floats(0, 1),
    threads=st.sampled_from([1, 2, 3]),
)
def test_random_shapes_float32_vector_paths(T, out, inp, frac, threads):
    # float32 takes the AVX2 paths (16-token blocks, 8 x 8 transposes with feature tails, four
    # indices at a time with and without a shared row) and splits tokens over threads
    k = int(frac * out * inp)
    gy, x, idx = _case(T, out, inp, k, torch.float32, seed=T * 10000 + out * 100 + inp)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.longtune.sparse_delta_grad(gy, x, idx, inp)
    finally:
        torch.set_num_threads(prev)
    ref = R.sparse_delta_grad(gy.double(), x.double(), idx, inp)
    assert_within_2x(got, ref, (gy.T @ x).reshape(-1)[idx], f"T={T} out={out} in={inp} k={k}")


@pytest.mark.parametrize("op", OPS)
def test_bad_indices(op):
    gy, x, _ = _case(4, 3, 5, 0, torch.float32)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        op(gy, x, torch.tensor([3, 1]), 5)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        op(gy, x, torch.tensor([1, 1]), 5)
    with pytest.raises(
        RuntimeError, match=r"indices must lie in \[0, out_features \* in_features\) = \[0, 15\)"
    ):
        op(gy, x, torch.tensor([0, 15]), 5)
    with pytest.raises(RuntimeError, match="indices must be a 1-D int64 tensor"):
        op(gy, x, torch.tensor([0, 1], dtype=torch.int32), 5)
    with pytest.raises(RuntimeError, match="x's last dimension must be in_features=4"):
        op(gy, x, torch.tensor([0]), 4)
    with pytest.raises(RuntimeError, match="same leading shape"):
        op(gy[:3], x, torch.tensor([0]), 5)
    with pytest.raises(RuntimeError, match="x must have grad_out's dtype"):
        op(gy, x.double(), torch.tensor([0]), 5)


# ------------------------------------------------------------------ SparseDeltaLinear
def test_module_forward_backward_match_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 8).double()
    m = longtune.nn.SparseDeltaLinear(lin, density=0.25, seed=1)
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        m.values.normal_()
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    y = m(x)
    ref = R.sparse_delta_linear(x, w0, lin.bias, m.indices, m.values)
    torch.testing.assert_close(m.base_weight(), w0)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    w = w0.reshape(-1).index_add(0, m.indices, m.values.detach()).reshape(8, 12)
    torch.testing.assert_close(x.grad, g @ w)
    dense_dw = (g.reshape(-1, 8).T @ x.detach().reshape(-1, 12)).reshape(-1)
    torch.testing.assert_close(m.values.grad, dense_dw[m.indices])
    assert lin.weight.grad is None and lin.bias.grad is None  # the base stays frozen


def test_gradcheck_float64():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4).double()
    m = longtune.nn.SparseDeltaLinear(lin, num_deltas=7, seed=2)
    fn = longtune.nn.sparse_delta._SparseDeltaFn

    def f(xx, vv):  # the merged weight is rebuilt from the (perturbed) values, as the module does
        merged = lin.weight.detach().reshape(-1).index_add(0, m.indices, vv.detach()).reshape(4, 6)
        return fn.apply(xx, vv, merged, lin.bias, m.indices)

    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, v))


def test_merged_weight_is_patched_after_optimizer_steps():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    m = longtune.nn.SparseDeltaLinear(lin, density=0.05, seed=0)
    w0 = lin.weight.detach().clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, target = torch.randn(64, 32), torch.randn(64, 16)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.mse_loss(m(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        expect = w0.reshape(-1).index_add(0, m.indices, m.values.detach()).reshape(16, 32)
        torch.testing.assert_close(m.merged_weight(), expect)
        assert (
            m.merged_weight() is lin.weight
        )  # the deltas live in the base weight: no second copy of W
    assert losses[-1] < losses[0]


def test_merge_unmerge_and_delta_state():
    lin = torch.nn.Linear(10, 6)
    w0 = lin.weight.detach().clone()
    m = longtune.nn.SparseDeltaLinear(lin, num_deltas=9, seed=3)
    with torch.no_grad():
        m.values.uniform_(-1, 1)
    x = torch.randn(4, 10)
    y = m(x)
    m.merge()
    torch.testing.assert_close(m(x), y)
    assert (m.values == 0).all()
    assert not torch.equal(m.base_weight(), w0)  # folded in
    m.unmerge()
    torch.testing.assert_close(m.base_weight(), w0)
    torch.testing.assert_close(m(x), y)
    state = m.delta_state_dict()
    m2 = longtune.nn.SparseDeltaLinear(torch.nn.Linear(10, 6), num_deltas=1, seed=0)
    with torch.no_grad():
        m2.base.weight.copy_(w0)
        m2.base.bias.copy_(lin.bias)
    m2.load_delta_state_dict(state)
    torch.testing.assert_close(m2(x), y)


def test_density_edges_and_bad_input():
    lin = torch.nn.Linear(4, 3)
    assert longtune.nn.SparseDeltaLinear(lin, density=1.0).values.numel() == 12
    assert longtune.nn.SparseDeltaLinear(torch.nn.Linear(4, 3), num_deltas=0).values.numel() == 0
    for bad in [0.0, -0.1, 1.5]:
        with pytest.raises(ValueError, match="density must be in"):
            longtune.nn.SparseDeltaLinear(torch.nn.Linear(4, 3), density=bad)
    with pytest.raises(ValueError, match="num_deltas must be in"):
        longtune.nn.SparseDeltaLinear(torch.nn.Linear(4, 3), num_deltas=13)
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        longtune.nn.SparseDeltaLinear(torch.nn.Conv1d(4, 3, 1))
    m = longtune.nn.SparseDeltaLinear(torch.nn.Linear(4, 3), num_deltas=2)
    with pytest.raises(ValueError, match="strictly increasing"):
        m.load_delta_state_dict({"indices": torch.tensor([5, 5]), "values": torch.zeros(2)})
    with pytest.raises(ValueError, match="out of range"):
        m.load_delta_state_dict({"indices": torch.tensor([5, 12]), "values": torch.zeros(2)})
    with pytest.raises(RuntimeError, match="nothing merged"):
        m.unmerge()
    with pytest.raises(
        TypeError, match="values are torch.float64 but the base weight is torch.float32"
    ):
        m.load_delta_state_dict(
            {"indices": torch.tensor([1, 2]), "values": torch.zeros(2, dtype=torch.float64)}
        )


def test_randomized_indices_are_sorted_unique_and_seeded():
    a = longtune.nn.SparseDeltaLinear(torch.nn.Linear(50, 40), density=0.1, seed=7).indices
    b = longtune.nn.SparseDeltaLinear(torch.nn.Linear(50, 40), density=0.1, seed=7).indices
    assert torch.equal(a, b) and bool((a[1:] > a[:-1]).all()) and a.numel() == 200


# ------------------------------------------------------------------ fused sparse AdamW
def _adamw_reference(values, grad, m, v, age, lr, b1, b2, eps, wd):
    # the kernel receives the hyper-parameters as float32: 1 - 0.999 is 1.0000467e-3 there
    lr, b1, b2, eps, wd = (
        float(torch.tensor(h, dtype=torch.float32)) for h in (lr, b1, b2, eps, wd)
    )
    age = age + 1
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    upd = (m / (1 - b1**age)) / (torch.sqrt(v / (1 - b2**age)) + eps)
    return values - lr * (upd + wd * values), m, v, age


ADAMW_OPS = [
    pytest.param(torch.ops.longtune.sparse_adamw_, id="cpu"),
    pytest.param(torch.ops.longtune_emu.sparse_adamw_, id="emulated-cuda"),
]


@pytest.mark.parametrize("op", ADAMW_OPS)
def test_sparse_adamw_matches_reference(op):
    torch.manual_seed(0)
    n = 300
    values, m, v = torch.randn(n), torch.randn(n) * 0.1, torch.rand(n) * 0.01
    age = torch.randint(0, 5, (n,), dtype=torch.int32)  # mixed ages: some deltas just regrown
    grad = torch.randn(n)
    ref = _adamw_reference(
        values.double(),
        grad.double(),
        m.double(),
        v.double(),
        age.double(),
        1e-2,
        0.9,
        0.999,
        1e-8,
        0.01,
    )
    op(values, grad, m, v, age, 1e-2, 0.9, 0.999, 1e-8, 0.01)
    torch.testing.assert_close(values.double(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.double(), ref[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(v.double(), ref[2], rtol=1e-5, atol=1e-9)
    assert torch.equal(age.double(), ref[3])


@pytest.mark.parametrize("cap", [1, 2])
def test_emulated_grid_cap(cap):
    # at most `cap` blocks: every warp of the gradient kernel sums several indices, every thread
    # of the AdamW kernel updates several deltas; the results are those of the uncapped launch
    gy, x, idx = _case(37, 24, 40, 50, torch.bfloat16)
    free = torch.ops.longtune_emu.sparse_delta_grad(gy, x, idx, 40)
    n = 1100
    state = [torch.randn(n), torch.randn(n), torch.randn(n) * 0.1, torch.rand(n) * 0.01]
    state.append(torch.randint(0, 5, (n,), dtype=torch.int32))
    a = [t.clone() for t in state[:1] + state[2:]]
    b = [t.clone() for t in a]
    torch.ops.longtune_emu.sparse_adamw_(a[0], state[1], *a[1:], 1e-2, 0.9, 0.999, 1e-8, 0.01)
    with emulator_grid_cap(cap):
        assert torch.equal(torch.ops.longtune_emu.sparse_delta_grad(gy, x, idx, 40), free)
        torch.ops.longtune_emu.sparse_adamw_(b[0], state[1], *b[1:], 1e-2, 0.9, 0.999, 1e-8, 0.01)
    for u, c in zip(a, b):
        assert torch.equal(c, u)


def test_sparse_adamw_matches_torch_adamw_and_bad_input():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(50))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = longtune.train.SparseAdamW([p1], lr=1e-2, weight_decay=0.1)
    o2 = torch.optim.AdamW([p2], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(50)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    # torch's AdamW decays before the update (p *= 1 - lr wd); ours decays the pre-step value in the
    # same step: identical to first order, equal up to lr^2 wd terms
    torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)
    vals, st = torch.zeros(4), torch.zeros(4)
    age = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="age must be int32"):
        torch.ops.longtune.sparse_adamw_(
            vals, vals, st, st.clone(), age.long(), 1e-3, 0.9, 0.999, 1e-8, 0.0
        )
    with pytest.raises(RuntimeError, match=r"beta1 and beta2 must be in \[0, 1\)"):
        torch.ops.longtune.sparse_adamw_(
            vals, vals, st, st.clone(), age, 1e-3, 1.0, 0.999, 1e-8, 0.0
        )
    with pytest.raises(RuntimeError, match="must have values' shape"):
        torch.ops.longtune.sparse_adamw_(
            vals, torch.zeros(3), st, st.clone(), age, 1e-3, 0.9, 0.999, 1e-8, 0.0
        )
    with pytest.raises(RuntimeError, match="exp_avg and exp_avg_sq must be float32"):
        torch.ops.longtune.sparse_adamw_(
            vals, vals, st.double(), st.clone(), age, 1e-3, 0.9, 0.999, 1e-8, 0.0
        )


def test_sparsify_a_model_and_train():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    longtune.sparsify(model, density=0.2, target_modules=["2"], seed=0)
    assert isinstance(model[2], longtune.nn.SparseDeltaLinear) and isinstance(
        model[0], torch.nn.Linear
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["2.values"]
    opt = longtune.train.SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="no nn.Linear matched"):
        longtune.sparsify(torch.nn.Sequential(torch.nn.ReLU()), density=0.1)


# ------------------------------------------------------------------ prune / regrow (SpIEL-AG)
def _spiel_setup(seed=0, optimizer="sparse"):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    longtune.sparsify(model, density=0.1, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        longtune.train.SparseAdamW(params, lr=1e-2)
        if optimizer == "sparse"
        else torch.optim.AdamW(params, lr=1e-2)
    )
    sched = longtune.train.SpIELScheduler(model, opt, update_every=4, window=2, drop_fraction=0.3)
    return model, opt, sched


def _train(model, opt, sched, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 24, generator=g), torch.randn(64, 8, generator=g)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimizer", ["sparse", "torch"])
def test_prune_regrow_keeps_k_sorted_unique_and_trains(optimizer):
    model, opt, sched = _spiel_setup(optimizer=optimizer)
    layers = sched.layers
    k0 = [l.values.numel() for l in layers]
    before = [l.indices.clone() for l in layers]
    losses = _train(model, opt, sched, 12)
    for l, k, b in zip(layers, k0, before):
        assert l.values.numel() == k and l.indices.numel() == k
        assert bool((l.indices[1:] > l.indices[:-1]).all())
        assert not torch.equal(l.indices, b)  # something was regrown
        assert any(
            p is l.values for g in opt.param_groups for p in g["params"]
        )  # optimizer follows
    assert losses[-1] < losses[0]


def test_regrown_deltas_start_from_zero_state():
    model, opt, sched = _spiel_setup()
    _train(model, opt, sched, 3)
    layer = sched.layers[0]
    old_idx = layer.indices.clone()
    _train(model, opt, sched, 1)  # step 4: update
    new = ~torch.isin(layer.indices, old_idx)
    assert new.any()
    st = opt.state[layer.values]
    # the regrow runs after the optimizer step, so grown entries have not been updated yet
    assert (layer.values.detach()[new] == 0).all()
    assert (st["exp_avg"][new] == 0).all() and (st["age"][new] == 0).all()
    kept = ~new
    assert (st["age"][kept] > 0).all()


def test_reproducible_and_resumable():
    runs = []
    for _ in range(2):
        model, opt, sched = _spiel_setup(seed=3)
        _train(model, opt, sched, 9, seed=1)
        runs.append([l.indices.clone() for l in sched.layers])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    model, opt, sched = _spiel_setup(seed=3)
    _train(model, opt, sched, 5, seed=1)
    state = sched.state_dict()
    sched2 = longtune.train.SpIELScheduler(model, opt, update_every=99, window=1, drop_fraction=0.0)
    sched2.load_state_dict(state)
    assert sched2.step_count == 5 and sched2.update_every == 4


def test_growth_candidates_never_hold_dense_dw_and_are_inactive():
    torch.manual_seed(0)
    layer = longtune.nn.SparseDeltaLinear(torch.nn.Linear(40, 30), density=0.2, seed=0)
    stats = longtune.train.sparse_delta._GrowthStats(layer, n_cand=25, tile_rows=7)  # 7-row tiles
    gy, x = torch.randn(16, 30), torch.randn(16, 40)
    stats(gy, x)
    dense = (gy.T @ x).abs().reshape(-1)
    dense[layer.indices] = -1
    expect = torch.sort(dense.topk(25).indices).values
    assert torch.equal(stats.cand, expect)
    assert not torch.isin(stats.cand, layer.indices).any()


def test_scheduler_bad_input():
    model, opt, _ = _spiel_setup()
    with pytest.raises(ValueError, match="window must be in"):
        longtune.train.SpIELScheduler(model, opt, update_every=4, window=5)
    with pytest.raises(ValueError, match="drop_fraction must be in"):
        longtune.train.SpIELScheduler(model, opt, drop_fraction=1.5)
    with pytest.raises(ValueError, match="no SparseDeltaLinear"):
        longtune.train.SpIELScheduler(torch.nn.Linear(3, 3), opt)
    layer = model[0]
    with pytest.raises(ValueError, match="unique and inactive"):
        layer.replace_deltas(torch.ones_like(layer.values, dtype=torch.bool), layer.indices[:1])


def test_spiel_on_a_tiny_llama_lowers_the_loss():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg)
    longtune.sparsify(
        model, density=0.05, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], seed=0
    )
    opt = longtune.train.SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = longtune.train.SpIELScheduler(model, opt, update_every=5, window=2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(10):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("growth", ["ag", "ma"])
def test_spiel_grows_the_fused_head_like_the_plain_head(growth):
    """The fused loss (lm_head="fused_ce") computes the sparse head's gradient whole: SpIEL's
    growth statistics come from it, and the head regrows the entries the plain head does."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    heads = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).double()
        longtune.sparsify(model, density=0.1, target_modules=["lm_head"], seed=0)
        if fused:
            longtune.patch(model, lm_head="fused_ce")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        sched = longtune.train.SpIELScheduler(
            model, opt, update_every=2, window=2, drop_fraction=0.5, growth=growth, tile_rows=16
        )
        before = model.lm_head.indices.clone()
        for _ in range(2):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            sched.step()
        heads.append(model.lm_head.indices.clone())
    assert not torch.equal(heads[0], before)
    assert torch.equal(heads[1], heads[0])


def test_lora_equivalent_budget_and_composition():
    m = longtune.nn.SparseDeltaLinear(torch.nn.Linear(40, 30), lora_rank=2, seed=0)
    assert m.values.numel() == 2 * (40 + 30)
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        longtune.nn.SparseDeltaLinear(torch.nn.Linear(4, 3), lora_rank=-1)
    a = {"indices": torch.tensor([1, 5, 9]), "values": torch.tensor([1.0, 2.0, 3.0])}
    b = {"indices": torch.tensor([0, 5]), "values": torch.tensor([10.0, 20.0])}
    c = longtune.nn.sparse_delta.compose_deltas(a, b)
    assert c["indices"].tolist() == [0, 1, 5, 9] and c["values"].tolist() == [10.0, 1.0, 22.0, 3.0]
    # the composed delta equals applying both
    base = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    layer = longtune.nn.SparseDeltaLinear(base, num_deltas=1)
    layer.load_delta_state_dict(c)
    w = base.weight.detach().reshape(-1).clone()
    w[a["indices"]] += a["values"]
    w[b["indices"]] += b["values"]
    torch.testing.assert_close(layer(x), x @ w.reshape(3, 4).T + base.bias.detach())


def test_spiel_ma_growth():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    longtune.sparsify(model, density=0.1, seed=0)
    opt = longtune.train.SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = longtune.train.SpIELScheduler(
        model, opt, update_every=4, window=2, growth="ma", tile_rows=5
    )
    layer = sched.layers[1]
    k, before = layer.values.numel(), layer.indices.clone()
    losses = _train(model, opt, sched, 8)
    assert layer.values.numel() == k and bool((layer.indices[1:] > layer.indices[:-1]).all())
    assert not torch.equal(layer.indices, before) and losses[-1] < losses[0]
    st = sched._sm3[id(layer)]
    assert st.row.shape == (8,) and st.col.shape == (32,) and (st.row > 0).all()
    # tile-wise candidates == the top inactive entries of the dense min(row, col) score
    # (min(row, col) has ties, so compare the selected scores, not the tie-broken positions)
    cand, score = st.candidates(10)
    dense = torch.minimum(st.row[:, None], st.col[None, :]).reshape(-1).clone()
    dense[layer.indices] = -1
    assert not torch.isin(cand, layer.indices).any()
    torch.testing.assert_close(score.sort().values.float(), dense.topk(10).values.sort().values)
    torch.testing.assert_close(dense[cand].double(), score)
    state = sched.state_dict()
    sched2 = longtune.train.SpIELScheduler(model, opt, growth="ma")
    sched2.load_state_dict(state)
    assert torch.equal(sched2._sm3[id(layer)].row, st.row)
    with pytest.raises(ValueError, match="growth must be 'ag'"):
        longtune.train.SpIELScheduler(model, opt, growth="random")


def test_sparse_adamw_opcheck():
    n = 33
    args = (
        torch.randn(n),
        torch.randn(n),
        torch.zeros(n),
        torch.zeros(n),
        torch.zeros(n, dtype=torch.int32),
        1e-3,
        0.9,
        0.999,
        1e-8,
        0.01,
    )
    torch.library.opcheck(
        torch.ops.longtune.sparse_adamw_.default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )
