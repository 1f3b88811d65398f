"""SeCO / SpaCO chunk-wise training (longtune.train.chunkwise): exactness against full backprop in
float64 (plain, peft LoRA, longtune-patched attention), S^2 attention, unbiasedness of SpaCO (exact
enumeration of the sampled sets and a seeded Monte-Carlo check; the residual multi-hop bias), the
cap, accumulation, reproducibility and bad inputs."""

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import longtune
from longtune.integrations import hf as lt_hf
from longtune.train import seco_backward, seco_train_step
from longtune.train.chunkwise import _chunkwise_backward, spaco_factors

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 101


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and leaves the other core alone."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        attention_dropout=0.0,
    )
    return LlamaForCausalLM(cfg).double()


def batch(n=48, b=1, seed=1, ignore_prefix=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, n), generator=g)
    labels = ids.clone()
    labels[:, :ignore_prefix] = -100  # a prompt that is not trained on
    labels[:, n // 2] = -100  # and a hole in the middle
    return ids, labels


def full_loss(model, ids, labels):
    """The HF causal-LM loss in float64. (transformers' ForCausalLMLoss upcasts logits with
    .float(), which *down*casts float64 logits to float32, so model(ids, labels=labels).loss is only
    ~1e-7 accurate; test_matches_hf_loss_path compares against it at that tolerance.)"""
    logits = model(input_ids=ids).logits
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=-100
    )


def grads(model):
    return {
        n: p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def full_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = full_loss(model, ids, labels)
    loss.backward()
    g = grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), g


def max_rel_err(got, ref):
    assert set(got) == set(ref), (sorted(set(ref) - set(got)), sorted(set(got) - set(ref)))
    scale = max(r.norm() for r in ref.values())
    return max(float((got[n] - ref[n]).norm() / max(ref[n].norm(), 1e-3 * scale)) for n in ref)


def lora(model):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )  # random B too: every LoRA gradient is non-zero
    return peft.get_peft_model(model, cfg)


VARIANTS = ["plain", "lora", "longtune_causal", "fused_ce_head"]


def make(variant):
    m = tiny_llama()
    if variant == "lora":
        m = lora(m)
    elif variant == "longtune_causal":
        longtune.patch(m, attention="causal")
    elif (
        variant == "fused_ce_head"
    ):  # chunk losses from hidden states through the fused linear + CE
        longtune.patch(m, attention="causal", lm_head="fused_ce")
    return m


# ----------------------------------------------------------------------------------- SeCO exactness
@pytest.mark.parametrize("variant", VARIANTS)
def test_seco_equals_full_backprop(variant):
    model = make(variant)
    ids, labels = batch()
    ref_loss, ref = full_grads(model, ids, labels)
    # 13: last chunk partial (48 = 3 * 13 + 9); 48: a single chunk (fewer sizes for the slower
    # variants)
    for chunk in (8, 16, 13, 48) if variant == "plain" else (16, 13):
        model.zero_grad(set_to_none=True)
        loss = seco_backward(model, ids, labels, chunk_size=chunk)
        assert not loss.requires_grad
        assert abs(float(loss) - float(ref_loss)) <= 1e-12 * abs(float(ref_loss)), (
            chunk,
            loss,
            ref_loss,
        )
        err = max_rel_err(grads(model), ref)
        assert err <= 1e-10, (variant, chunk, err)
    if variant == "lora":  # only the adapters are trained
        assert all("lora_" in n for n in ref)


def test_matches_hf_loss_path():
    """Against model(ids, labels=labels).loss.backward() itself (its cross-entropy runs in
    float32)."""
    model = tiny_llama()
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    loss = seco_backward(model, ids, labels, chunk_size=16)
    hf_loss = out.loss.item()
    assert abs(float(loss) - hf_loss) <= 1e-6 * hf_loss
    assert max_rel_err(grads(model), ref) <= 1e-5


def test_batch_of_equal_length_rows_and_ones_mask():
    model = tiny_llama()
    ids, labels = batch(n=40, b=2)
    ref_loss, ref = full_grads(model, ids, labels)
    loss = seco_backward(model, ids, labels, chunk_size=12, attention_mask=torch.ones_like(ids))
    assert abs(float(loss) - float(ref_loss)) <= 1e-12 * float(ref_loss)
    assert max_rel_err(grads(model), ref) <= 1e-10


def test_full_budget_is_seco():
    model = tiny_llama()
    ids, labels = batch()
    _, ref = full_grads(model, ids, labels)
    seco_backward(
        model,
        ids,
        labels,
        chunk_size=16,
        budget=3,
        cap=None,
        generator=torch.Generator().manual_seed(3),
    )
    assert max_rel_err(grads(model), ref) <= 1e-10


# ------------------------------------------------------------------------------------ S^2 attention
def test_s2_kernel_chunkable_with_bottom_right_alignment():
    """Kernel level: S^2 groups are absolute positions, and with q_offset = nk - nq (the default) a
    chunk's queries against all past keys see exactly the rows of the full leak-free S^2 mask."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 48, 4, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 48, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    full = longtune.sparse_attention(q, k, v, s2_group_size=8)
    for s, e in [(0, 16), (16, 32), (32, 48), (13, 26), (39, 48)]:
        part = longtune.sparse_attention(q[:, s:e], k[:, :e], v[:, :e], s2_group_size=8)
        torch.testing.assert_close(part, full[:, s:e], rtol=0, atol=1e-13)
    with pytest.raises(
        RuntimeError, match="longlora_roll"
    ):  # its wrap-around sees the future: not chunkable
        longtune.sparse_attention(
            q[:, 16:32], k[:, :32], v[:, :32], s2_group_size=8, s2_mode="longlora_roll"
        )


def _s2_grads(model, ids, labels, chunk=None):
    model.zero_grad(set_to_none=True)
    if chunk is None:
        full_loss(model, ids, labels).backward()
    else:
        seco_backward(model, ids, labels, chunk_size=chunk)
    return grads(model)


def test_s2_patched_model_chunked():
    """Model level with longtune.patch(attention="s2", group_size=G): a query chunk against the
    longer past KV gets the same S^2 rows (groups are absolute positions, bottom-right aligned), so
    chunk-wise gradients equal full S^2 backprop."""
    model = tiny_llama()
    longtune.patch(model, attention="s2", group_size=8)
    model.train()
    ids, labels = batch()
    ref = _s2_grads(model, ids, labels)
    for chunk in (48, 16, 13):
        assert max_rel_err(_s2_grads(model, ids, labels, chunk=chunk), ref) <= 1e-10, chunk
    longtune.patch(model, attention="causal")  # S^2 really is different from causal here
    assert max_rel_err(_s2_grads(model, ids, labels), ref) > 1e-3


# ------------------------------------------------------------------------------------ SpaCO
def _small(layers=1):
    """5 chunks of 3 tokens. One layer: the k/v gradient makes at most one hop (chunk -> earlier
    chunk -> parameters), where SpaCO is exactly unbiased; two layers: also two-hop paths."""
    model = tiny_llama(hidden=16, layers=layers, heads=2, kv_heads=1)
    ids, labels = batch(n=15, ignore_prefix=2)
    return model, ids, labels


def _subset_grads(model, ids, labels, sub, local_w, relay_w):
    model.zero_grad(set_to_none=True)
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    _chunkwise_backward(model, ids, shift, 3, sub, local_w, relay_w, int((shift != -100).sum()))
    return grads(model)


def _expectation(model, ids, labels, k, local_w, relay_w):
    """Exact E[gradient] under uniform K-of-N sampling: the mean over all C(N, K) sets."""
    subsets = list(itertools.combinations(range(5), k))
    acc = None
    for sub in subsets:
        g = _subset_grads(model, ids, labels, sub, local_w, relay_w)
        acc = g if acc is None else {n: acc[n] + g[n] for n in acc}
    return {n: t / len(subsets) for n, t in acc.items()}


def test_spaco_factors():
    assert spaco_factors(8, 2, cap=None) == (4.0, 7.0)
    assert spaco_factors(8, 2) == (2.0, 2.0)
    assert spaco_factors(8, 1, cap=None) == (8.0, 0.0)
    assert spaco_factors(5, 5, cap=None) == (1.0, 1.0)


@pytest.mark.parametrize("k", [2, 3])
def test_spaco_exactly_unbiased_one_layer(k):
    model, ids, labels = _small(layers=1)
    _, ref = full_grads(model, ids, labels)
    mean = _expectation(model, ids, labels, k, *spaco_factors(5, k, cap=None))
    # exact up to float32 rounding: LlamaRMSNorm computes in float32 even in a float64 model, and
    # rounding the *sum* of local and relayed gradients there is not linear in the sampled set
    assert max_rel_err(mean, ref) <= 1e-6
    # relaying with the naive N/K (instead of (N-1)/(K-1)) under-weights the k/v gradient
    naive = _expectation(model, ids, labels, k, 5 / k, 5 / k)
    assert max_rel_err(naive, ref) > 1e-2


def test_spaco_bias_multi_hop():
    """Two layers: two-hop paths (loss -> k/v of a layer-1 -> layer-0 k/v of an earlier chunk) are
    under-weighted and paths through more than K chunks never observed; the bias stays small with
    K = 3 of 5, and K = 1 (no relayed gradient at all) is biased."""
    model, ids, labels = _small(layers=2)
    _, ref = full_grads(model, ids, labels)
    norm = math.sqrt(sum(float(r.square().sum()) for r in ref.values()))

    def rel_bias(k):
        mean = _expectation(model, ids, labels, k, *spaco_factors(5, k, cap=None))
        return math.sqrt(sum(float((mean[n] - ref[n]).square().sum()) for n in ref)) / norm

    b3, b1 = rel_bias(3), rel_bias(1)
    assert b3 < 0.05, b3
    assert b1 > 1e-2, b1


def test_spaco_cap_biases():
    model, ids, labels = _small(layers=1)
    _, ref = full_grads(model, ids, labels)
    capped = _expectation(model, ids, labels, 2, *spaco_factors(5, 2, cap=1.5))  # cap < N/K = 2.5
    assert max_rel_err(capped, ref) > 1e-2
    num = sum(float((capped[n] * ref[n]).sum()) for n in ref)  # biased low: the expectation shrinks
    den = sum(float((ref[n] * ref[n]).sum()) for n in ref)
    assert num / den < 0.9


def test_spaco_monte_carlo_mean_converges():
    """The public API with a seeded generator (one layer, where the estimator is unbiased): the mean
    of M sampled gradients is within 4.5 standard errors of the full gradient elementwise on a few
    parameters, and its squared deviation is of the order of the estimated variance of the mean."""
    model, ids, labels = _small(layers=1)
    _, ref = full_grads(model, ids, labels)
    names = [
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ]
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1234)
    m = 200
    samples = {n: [] for n in names}
    for _ in range(m):
        model.zero_grad(set_to_none=True)
        seco_backward(model, ids, labels, chunk_size=3, budget=2, cap=None, generator=gen)
        for n in names:
            samples[n].append(params[n].grad.clone())
    dev2, var2 = 0.0, 0.0
    for n in names:
        s = torch.stack(samples[n])
        mean, se = s.mean(0), s.std(0) / math.sqrt(m)
        diff = (mean - ref[n]).abs()
        assert bool((diff <= 4.5 * se + 1e-12 * ref[n].abs().max()).all()), n
        dev2 += float((diff**2).sum())
        var2 += float((se**2).sum())
    assert dev2 <= 3.0 * var2, (dev2, var2)


def test_spaco_reproducible():
    model, ids, labels = _small()
    runs = []
    for seed in (7, 7, 8):
        model.zero_grad(set_to_none=True)
        loss = seco_backward(
            model,
            ids,
            labels,
            chunk_size=3,
            budget=2,
            generator=torch.Generator().manual_seed(seed),
        )
        runs.append((loss, grads(model)))
    (l0, g0), (l1, g1), (_, g2) = runs
    assert float(l0) == float(l1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    assert any(
        not torch.equal(g0[n], g2[n]) for n in g0
    )  # seeds 7 and 8 draw different chunk pairs
    ref_loss, _ = full_grads(model, ids, labels)
    assert abs(float(l0) - float(ref_loss)) <= 1e-12 * float(
        ref_loss
    )  # the loss is always the full loss


def test_spaco_full_loss_false_skips_the_head_and_estimates_the_loss():
    model, ids, labels = _small()
    n_chunks, k = math.ceil(ids.shape[1] / 3), 2
    model.zero_grad(set_to_none=True)
    seco_backward(
        model, ids, labels, chunk_size=3, budget=k, generator=torch.Generator().manual_seed(7)
    )
    g_full = grads(model)
    model.zero_grad(set_to_none=True)
    head_calls = []
    hook = model.lm_head.register_forward_hook(
        lambda mod, inp, out: head_calls.append(inp[0].shape[1])
    )
    try:
        est = seco_backward(
            model,
            ids,
            labels,
            chunk_size=3,
            budget=k,
            generator=torch.Generator().manual_seed(7),
            full_loss=False,
        )
    finally:
        hook.remove()
    # same gradient; the head ran over a full chunk only in phase 2 of the k sampled chunks
    assert all(torch.equal(g_full[n], g) for n, g in grads(model).items())
    assert sum(1 for c in head_calls if c > 1) == k, head_calls
    assert len(head_calls) == k, head_calls  # phase 1 stops before the head (at the last k/v write)
    # the returned loss is N/K times the sum of the sampled chunks' losses
    sampled = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(7))[:k].tolist()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    tok = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=-100, reduction="none"
    ).view_as(shift)
    n_t = int((shift != -100).sum())
    expect = sum(float(tok[:, 3 * i : 3 * i + 3].sum()) for i in sampled) / n_t * n_chunks / k
    assert abs(float(est) - expect) <= 1e-10 * abs(expect), (float(est), expect)


@pytest.mark.parametrize("variant", ["plain", "lora"])
def test_phase1_stops_at_the_last_kv_write(variant):
    """Phase 1 wants only the k/v: the last layer's MLP, the final norm and the head never run there
    (its attention stops at the cache write); phase 2 runs every sampled chunk through all of
    them."""
    model = make(variant)
    ids, labels = batch()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    calls = {"first_mlp": 0, "last_mlp": 0, "norm": 0, "head": 0}
    mods = {
        "first_mlp": base.model.layers[0].mlp,
        "last_mlp": base.model.layers[-1].mlp,
        "norm": base.model.norm,
        "head": base.lm_head,
    }
    hooks = [
        m.register_forward_hook(lambda *a, key=key: calls.__setitem__(key, calls[key] + 1))
        for key, m in mods.items()
    ]
    try:
        n_chunks = math.ceil(ids.shape[1] / 10)
        seco_backward(model, ids, labels, chunk_size=10)
    finally:
        for h in hooks:
            h.remove()
    # SeCO: phase 1 runs chunks 0..N-2, phase 2 all N
    assert calls == {
        "first_mlp": 2 * n_chunks - 1,
        "last_mlp": n_chunks,
        "norm": n_chunks,
        "head": n_chunks,
    }, calls


def test_model_that_bypasses_the_cache_is_refused():
    """A layer whose attention never calls cache.update: phase 1 cannot collect its k/v -> a clear
    error."""
    model = tiny_llama()
    attn = model.model.layers[-1].self_attn
    orig = attn.forward

    def no_cache(*args, **kwargs):
        for key in ("past_key_values", "past_key_value", "cache"):
            kwargs.pop(key, None)
        return orig(*args, **kwargs)

    attn.forward = no_cache
    ids, labels = batch()
    with pytest.raises(RuntimeError, match="cache interface"):
        seco_backward(model, ids, labels, chunk_size=10)


# ------------------------------------------------------------------------------------ training glue
def test_gradient_accumulation():
    model = tiny_llama()
    a, la = batch(seed=1)
    b, lb = batch(seed=2)
    _, ga = full_grads(model, a, la)
    _, gb = full_grads(model, b, lb)
    seco_backward(model, a, la, chunk_size=16)
    seco_backward(model, b, lb, chunk_size=13)
    assert max_rel_err(grads(model), {n: ga[n] + gb[n] for n in ga}) <= 1e-10


def test_train_step_matches_full_step():
    model = tiny_llama()
    twin = tiny_llama()
    ids, labels = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.1)
    loss = seco_train_step(model, opt, ids, labels, chunk_size=16)
    opt2.zero_grad()
    ref_loss = full_loss(twin, ids, labels)
    ref_loss.backward()
    opt2.step()
    assert abs(float(loss) - ref_loss.item()) <= 1e-12 * ref_loss.item()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=n)


def test_bad_inputs():
    model = tiny_llama(hidden=16, layers=1, heads=2, kv_heads=1)
    ids, labels = batch(n=12)
    with pytest.raises(ValueError, match="chunk_size=0"):
        seco_backward(model, ids, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"seq_len=12.*chunk_size=13"):
        seco_backward(model, ids, labels, chunk_size=13)
    with pytest.raises(ValueError, match="budget=0"):
        seco_backward(model, ids, labels, chunk_size=4, budget=0)
    with pytest.raises(ValueError, match=r"number of chunks=3.*budget=4"):
        seco_backward(model, ids, labels, chunk_size=4, budget=4)
    with pytest.raises(ValueError, match="does not match"):
        seco_backward(model, ids, labels[:, :10], chunk_size=4)
    with pytest.raises(ValueError, match="cap"):
        seco_backward(model, ids, labels, chunk_size=4, budget=2, cap=0)
    with pytest.raises(ValueError, match="attention_mask shape"):
        seco_backward(model, ids, labels, chunk_size=4, attention_mask=torch.ones_like(ids[:, :-1]))
    model.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="ignored"):
        loss = seco_backward(model, ids, torch.full_like(labels, -100), chunk_size=4)
    assert float(loss) == 0.0 and not torch.isnan(loss)
    assert all(p.grad is None for p in model.parameters())
    # only the first label is a target: the shift leaves nothing to predict either
    lab = torch.full_like(labels, -100)
    lab[:, 0] = 5
    with pytest.warns(UserWarning):
        assert float(seco_backward(model, ids, lab, chunk_size=4)) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seco_backward(model, ids[0], labels[0], chunk_size=5)  # 1-D input: one sequence


@pytest.mark.parametrize("attention", [None, "causal", "s2"])
def test_padded_batch_is_exact(attention):
    """Left- and right-padded rows in one batch: every chunk runs with its columns of the padding
    mask (as a cached forward does), so SeCO's gradient is full backprop's with the same mask -- on
    transformers' own sdpa attention and on longtune's."""
    model = tiny_llama()
    if attention:
        lt_hf.patch(model, attention=attention)
    model.train()
    ids, labels = batch(n=40, b=3)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    mask[2, -9:] = 0  # right padding
    labels = labels.masked_fill(mask == 0, -100)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    F.cross_entropy(logits.reshape(-1, VOCAB), shift.reshape(-1), ignore_index=-100).backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    seco_backward(model, ids, labels, chunk_size=12, attention_mask=mask)
    assert max_rel_err(grads(model), ref) <= 1e-10
