"""Hugging Face integration: longtune.patch / unpatch, the LongLoRA recipe, SQA conversion,
LM-Infinite generation, save / load."""

import pytest
import torch

import longtune
from longtune.integrations import hf as lt_hf
from longtune.integrations.lm_infinite import lambda_cache
from longtune.reference import attention as ref

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AttentionInterface,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask  # noqa: E402

FAMILIES = [
    (LlamaConfig, LlamaForCausalLM),
    (Qwen2Config, Qwen2ForCausalLM),
    (MistralConfig, MistralForCausalLM),
]


def tiny(C, M, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    cfg = C(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attention_dropout=0.0,
        **kw,
    )
    return M(cfg).to(dtype).eval()


def _ref_s2_attention(group_size):
    """A transformers attention function computing S^2-Attn with longtune.reference (float64
    spec)."""

    def fwd(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        kpm = None if attention_mask is None else attention_mask[:, -k.shape[1] :].bool()
        g = group_size if module.training else None
        return ref.sparse_attention(
            q, k, v, s2_group_size=g, softmax_scale=scaling, key_padding_mask=kpm
        ), None

    return fwd


@pytest.mark.parametrize("C,M", FAMILIES, ids=["llama", "qwen2", "mistral"])
def test_patched_eval_equals_unpatched(C, M):
    m = tiny(C, M)
    x = torch.randint(0, 101, (2, 40))
    am = torch.ones(2, 40, dtype=torch.long)
    am[1, 30:] = 0  # right padding
    want = m(x, attention_mask=am).logits
    longtune.patch(m, attention="s2")
    assert m.config._attn_implementation == "longtune_s2"
    got = m(x, attention_mask=am).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1, :30], want[1, :30], rtol=1e-10, atol=1e-10)
    longtune.patch(m, attention="causal")
    torch.testing.assert_close(m(x).logits, tiny(C, M)(x).logits, rtol=1e-10, atol=1e-10)
    longtune.unpatch(m)
    assert m.config._attn_implementation == "sdpa" and not hasattr(m.config, "longtune_patch")


@pytest.mark.parametrize("C,M", FAMILIES, ids=["llama", "qwen2", "mistral"])
def test_patched_train_equals_reference_s2(C, M):
    m = tiny(C, M)
    x = torch.randint(0, 101, (2, 48))
    longtune.patch(m, attention="s2")  # G = 48 / 4 = 12
    m.train()
    got = m(x).logits
    AttentionInterface.register("test_ref_s2", _ref_s2_attention(12))
    AttentionMaskInterface.register("test_ref_s2", flash_attention_mask)
    m2 = tiny(C, M)
    m2.set_attn_implementation("test_ref_s2")
    m2.train()
    torch.testing.assert_close(got, m2(x).logits, rtol=1e-10, atol=1e-10)
    # and S^2 really differs from dense causal attention
    assert (got - tiny(C, M)(x).logits).abs().max() > 1e-3


def test_mistral_sliding_window_is_honoured():
    m = tiny(MistralConfig, MistralForCausalLM, sliding_window=8)
    x = torch.randint(0, 101, (1, 30))
    want = m(x).logits
    longtune.patch(m, attention="causal")
    torch.testing.assert_close(m(x).logits, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("train", [False, True])
def test_batch_with_different_padding_equals_unbatched(train):
    m = tiny(LlamaConfig, LlamaForCausalLM)
    longtune.patch(m, attention="s2", group_size=8)
    m.train(train)
    lens = [32, 21, 9]
    x = torch.randint(0, 101, (3, 32))
    am = torch.zeros(3, 32, dtype=torch.long)
    for i, L in enumerate(lens):
        am[i, :L] = 1
    batched = m(x, attention_mask=am).logits
    for i, L in enumerate(lens):
        one = m(x[i : i + 1, :L]).logits
        torch.testing.assert_close(batched[i, :L], one[0], rtol=1e-10, atol=1e-10)


def test_patch_options_and_errors():
    m = tiny(LlamaConfig, LlamaForCausalLM)
    with pytest.raises(ValueError, match="attention must be one of"):
        longtune.patch(m, attention="flash")
    with pytest.raises(ValueError, match="unknown option"):
        longtune.patch(m, attention="s2", windw=3)
    with pytest.raises(ValueError, match="group_size_ratio"):
        longtune.patch(m, attention="s2", group_size_ratio=2)
    with pytest.raises(ValueError, match="no stored longtune patch"):
        longtune.patch(m)
    m.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="strict=False"):
        longtune.patch(m, attention="causal")
    m2 = tiny(LlamaConfig, LlamaForCausalLM)
    for layer in m2.model.layers:
        layer.self_attn.attention_dropout = 0.1
    longtune.patch(m2, attention="causal")
    m2.train()
    with pytest.raises(ValueError, match="no attention dropout"):
        m2(torch.randint(0, 101, (1, 8)))


def test_save_load_reapplies_patch(tmp_path):
    m = tiny(LlamaConfig, LlamaForCausalLM)
    longtune.patch(m, attention="s2", group_size_ratio=0.5, mode="longlora_roll")
    m.train()
    x = torch.randint(0, 101, (1, 32))
    want = m(x).logits
    m.save_pretrained(tmp_path)
    m2 = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert m2.config.longtune_patch["mode"] == "longlora_roll"
    longtune.patch(m2)  # one call re-applies the stored patch
    m2.train()
    assert m2.config._attn_implementation == "longtune_s2"
    torch.testing.assert_close(m2(x).logits, want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ LongLoRA recipe
def test_longlora_recipe_trains_lora_embeddings_and_norms_only():
    pytest.importorskip("peft")
    m = tiny(LlamaConfig, LlamaForCausalLM, dtype=torch.float32)
    model, summary = longtune.recipes.longlora(m, target_context=512, lora_r=4)
    assert summary["rope_factor"] == 4.0 and model.config.max_position_embeddings == 512
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert (
        summary["by_kind"]["lora"] > 0
        and summary["by_kind"]["embeddings"] > 0
        and summary["by_kind"]["norms"] > 0
    )
    assert summary["by_kind"]["other"] == 0
    model.train()
    torch.manual_seed(0)
    x = torch.randint(0, 101, (2, 64))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < losses[0] - 0.1
    for n, p in model.named_parameters():
        has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
        allowed = "lora_" in n or "embed" in n or "norm" in n
        assert not has_grad or allowed, n
        if "lora_" in n:
            assert p.requires_grad
        if not allowed:
            assert not p.requires_grad, n


def test_rope_interpolation_matches_linear_scaling():
    m = tiny(LlamaConfig, LlamaForCausalLM)
    longtune.recipes._rope_interpolate(m, 256, "linear")
    rot = m.model.rotary_emb
    x = torch.zeros(1, 4, 16, dtype=torch.float64)
    cos, _ = rot(x, torch.tensor([[0, 2, 4, 6]]))
    cos_half, _ = tiny(LlamaConfig, LlamaForCausalLM).model.rotary_emb(
        x, torch.tensor([[0, 1, 2, 3]])
    )
    torch.testing.assert_close(cos, cos_half)  # positions are compressed by the factor 2


# ------------------------------------------------------------------ SQA conversion
def test_convert_to_sqa_identity_and_reduction():
    m = tiny(LlamaConfig, LlamaForCausalLM)
    x = torch.randint(0, 101, (1, 20))
    want = m(x).logits
    longtune.convert_to_sqa(m, num_query_heads=4)  # keep every head: same function
    torch.testing.assert_close(m(x).logits, want, rtol=1e-10, atol=1e-10)
    m2 = tiny(LlamaConfig, LlamaForCausalLM)
    longtune.convert_to_sqa(m2, num_query_heads=2, rule="average")
    attn = m2.model.layers[0].self_attn
    assert attn.q_proj.out_features == 2 * 16 and attn.o_proj.in_features == 2 * 16
    y = m2(x).logits
    assert y.shape == want.shape and torch.isfinite(y).all()
    m3 = tiny(LlamaConfig, LlamaForCausalLM)
    longtune.convert_to_sqa(m3, variant="xsmqa")  # H/4 = 1 query head, 1 kv head
    assert m3.model.layers[0].self_attn.k_proj.out_features == 16
    assert torch.isfinite(m3(x).logits).all()


def test_convert_to_sqa_average_is_exact_for_duplicated_heads():
    m = tiny(LlamaConfig, LlamaForCausalLM)
    x = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        for layer in m.model.layers:
            a = layer.self_attn
            w = a.q_proj.weight.view(4, 16, -1)
            w[1].copy_(w[0])
            w[3].copy_(w[2])  # heads (0, 1) share kv head 0, (2, 3) kv head 1
    want = m(x).logits
    longtune.convert_to_sqa(m, num_query_heads=2, rule="average")
    torch.testing.assert_close(m(x).logits, want, rtol=1e-9, atol=1e-9)


def test_convert_to_sqa_errors():
    m = tiny(LlamaConfig, LlamaForCausalLM)
    with pytest.raises(ValueError, match="rule"):
        longtune.convert_to_sqa(m, num_query_heads=2, rule="max")
    with pytest.raises(ValueError, match="exceeds"):
        longtune.convert_to_sqa(m, num_query_heads=8)
    with pytest.raises(ValueError, match="num_query_heads or variant"):
        longtune.convert_to_sqa(m)


# ------------------------------------------------------------------ LM-Infinite
def test_lambda_first_window_tokens_equal_unpatched():
    m = tiny(LlamaConfig, LlamaForCausalLM)
    x = torch.randint(0, 101, (1, 24))
    with torch.no_grad():
        want = m(x).logits
        longtune.patch(m, attention="lambda", window=24, n_global=3)
        got = m(x).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_lambda_mask_matches_reference_without_cap():
    m = tiny(LlamaConfig, LlamaForCausalLM)
    x = torch.randint(0, 101, (1, 40))
    longtune.patch(m, attention="lambda", window=8, n_global=2, cap_distance=False)

    def fwd(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return ref.sparse_attention(q, k, v, window=8, n_global=2, softmax_scale=scaling), None

    AttentionInterface.register("test_ref_lambda", fwd)
    AttentionMaskInterface.register("test_ref_lambda", flash_attention_mask)
    m2 = tiny(LlamaConfig, LlamaForCausalLM)
    m2.set_attn_implementation("test_ref_lambda")
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, m2(x).logits, rtol=1e-10, atol=1e-10)


def test_lambda_generation_bounded_cache_and_finite_past_trained_length():
    m = tiny(LlamaConfig, LlamaForCausalLM, dtype=torch.float32)  # trained length 128
    longtune.patch(m, attention="lambda", window=16, n_global=2)
    cache = lambda_cache(m)
    x = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        out = m.generate(
            x,
            max_new_tokens=160,
            do_sample=False,
            cache=cache,
            min_new_tokens=160,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert out.sequences.shape[1] == 170  # past the trained length of 128
    assert all(torch.isfinite(s).all() for s in out.logits)
    for layer in cache.layers:
        assert layer.keys.shape[-2] <= 2 + 16 - 1
    assert cache.get_seq_length() >= 169


def test_lambda_cached_decoding_equals_uncached():
    """Step-by-step decoding with the O(window) cache equals recomputing the whole prefix with the
    Lambda-mask (the cache drops exactly what the mask hides)."""
    m = tiny(LlamaConfig, LlamaForCausalLM)
    longtune.patch(m, attention="lambda", window=6, n_global=2)
    x = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        full = m(x).logits
        cache = lambda_cache(m)
        m(x[:, :5], cache=cache, use_cache=True)
        for t in range(5, 20):
            step = m(x[:, t : t + 1], cache=cache, use_cache=True).logits
            torch.testing.assert_close(step[0, -1], full[0, t], rtol=1e-9, atol=1e-9)


def test_lambda_is_inference_only():
    m = tiny(LlamaConfig, LlamaForCausalLM)
    longtune.patch(m, attention="lambda", window=8, n_global=2)
    with pytest.raises(RuntimeError, match="for inference"):
        m(torch.randint(0, 101, (1, 8)))
    with pytest.raises(ValueError, match="patch the model first"):
        lambda_cache(tiny(LlamaConfig, LlamaForCausalLM))


def test_attn_implementation_by_name(tmp_path):
    lt_hf.register()
    m = tiny(LlamaConfig, LlamaForCausalLM)
    x = torch.randint(0, 101, (1, 32))
    want = m(x).logits
    m.save_pretrained(tmp_path)
    m2 = LlamaForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float64, attn_implementation="longtune_s2"
    )
    assert m2.config._attn_implementation == "longtune_s2"
    torch.testing.assert_close(m2(x).logits, want, rtol=1e-10, atol=1e-10)  # eval: dense
    m2.train()
    assert (m2(x).logits - want).abs().max() > 1e-3  # train: S^2 with the default ratio


@pytest.mark.parametrize("C,M", FAMILIES[:2], ids=["llama", "qwen2"])
def test_fused_ce_lm_head_equals_hf_loss(C, M):
    m = tiny(C, M)
    x = torch.randint(0, 101, (2, 24))
    labels = x.clone()
    labels[0, :5] = -100
    ref = tiny(C, M)
    logits = ref(x).logits
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 101), labels[:, 1:].reshape(-1)
    )
    want.backward()
    longtune.patch(m, attention="causal", lm_head="fused_ce")
    out = m(x, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-10)
    out.loss.backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=n)
    assert m(x).logits.shape == (2, 24, 101)  # without labels: the model's own forward
    stored = dict(m.config.longtune_patch)
    assert stored["lm_head"] == "fused_ce"
    longtune.unpatch(m)
    assert m(x, labels=labels).logits is not None
