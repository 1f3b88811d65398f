"""longtune.patch on the model families beyond Llama / Qwen2 / Mistral
(tests/test_hf_integration.py): Qwen3 (q/k norms), Phi-3 (fused qkv_proj), Mixtral and Qwen3-MoE
(attention unchanged, router untouched), OLMo-2, Gemma-2 (attention logit softcapping in the
kernels, sliding-window layers, final-logit softcapping in the fused CE head), Gemma-3 (alternating
sliding-window / global layers, its own query scaling). Each: eval logits equal transformers' own
attention (with padding), S^2-Attn in training equals the spec, greedy generation with a KV cache
equals the unpatched model's, chunk-wise training is exact, and the patch survives save / load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
import transformers as T  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask  # noqa: E402

import longtune  # noqa: E402
from longtune.reference import attention as R  # noqa: E402

VOCAB = 101
FAMILIES = {
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {}),
    "phi3": (
        T.Phi3Config,
        T.Phi3ForCausalLM,
        {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1},
    ),
    "mixtral": (
        T.MixtralConfig,
        T.MixtralForCausalLM,
        {"num_local_experts": 4, "num_experts_per_tok": 2, "experts_implementation": "eager"},
    ),
    "qwen3_moe": (
        T.Qwen3MoeConfig,
        T.Qwen3MoeForCausalLM,
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "experts_implementation": "eager",
        },
    ),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, {"pad_token_id": 0, "eos_token_id": 1}),
    # small caps, so that the tanh bends the tiny model's scores and logits (the defaults are 50 /
    # 30); transformers' eager attention is Gemma-2's reference implementation of the softcap
    "gemma2": (
        T.Gemma2Config,
        T.Gemma2ForCausalLM,
        {
            "head_dim": 16,
            "sliding_window": 8,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 0.3,
            "final_logit_softcapping": 0.5,
            "attn_implementation": "eager",
        },
    ),
    "gemma3": (
        T.Gemma3TextConfig,
        T.Gemma3ForCausalLM,
        {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 24},
    ),
}
NAMES = list(FAMILIES)
# transformers' eager attention (Gemma-2's softcapping implementation) runs its softmax in float32
# even in a float64 model: comparisons against it hold to float32 rounding only
TOL = {"gemma2": 1e-6}


def tiny(name, seed=0):
    C, M, kw = FAMILIES[name]
    torch.manual_seed(seed)
    cfg = C(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attention_dropout=0.0,
        **kw,
    )
    return M(cfg).double().eval()


def _ref_s2(group_size):
    def fwd(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        kpm = None if attention_mask is None else attention_mask[:, -k.shape[1] :].bool()
        w = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        return R.sparse_attention(
            q,
            k,
            v,
            s2_group_size=group_size,
            softmax_scale=scaling,
            key_padding_mask=kpm,
            window=w,
            softcap=kwargs.get("softcap"),
        ), None

    return fwd


@pytest.mark.parametrize("name", NAMES)
def test_eval_with_padding_equals_the_models_own_attention(name):
    m = tiny(name)
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 40, dtype=torch.long)
    am[1, 28:] = 0
    want = m(x, attention_mask=am).logits
    if name == "gemma2":
        # transformers' float64 eager Gemma-2 returns NaN for the whole padded row; with right
        # padding the real rows equal the unpadded sequence's
        want = torch.cat([want[:1], torch.nn.functional.pad(m(x[1:, :28]).logits, (0, 0, 0, 12))])
    longtune.patch(m, attention="s2")
    got = m(x, attention_mask=am).logits
    tol = TOL.get(name, 1e-10)
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1, :28], want[1, :28], rtol=tol, atol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_s2_training_equals_the_spec(name):
    m = tiny(name).train()
    x = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(2))
    longtune.patch(m, attention="s2")  # G = 12
    got = m(x).logits
    impl = f"test_family_ref_s2_{name}"
    AttentionInterface.register(impl, _ref_s2(12))
    AttentionMaskInterface.register(impl, flash_attention_mask)
    ref = tiny(name).train()
    ref.set_attn_implementation(impl)
    torch.testing.assert_close(got, ref(x).logits, rtol=1e-10, atol=1e-10)
    assert (got - tiny(name).train()(x).logits).abs().max() > 1e-4  # S^2 differs from dense causal


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_equals_unpatched(name):
    m = tiny(name)
    x = torch.randint(2, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    want = m.generate(x, **kw)
    longtune.patch(m, attention="causal")
    assert torch.equal(m.generate(x, **kw), want)


def _gemma_norm_in_model_dtype(self, x):
    return self._norm(x) * (1.0 + self.weight)


@pytest.mark.parametrize("name", NAMES)
def test_chunkwise_training_is_exact(name, monkeypatch):
    if name in ("gemma2", "gemma3"):
        # Gemma-2/3's RMSNorm computes in float32 (x.float()) even in a float64 model, which turns
        # the last-bit differences between chunked and whole-sequence attention into 2e-7 gradient
        # differences; in the model's dtype the chunk-wise gradient is exact
        norm = (
            T.models.gemma2.modeling_gemma2.Gemma2RMSNorm
            if name == "gemma2"
            else T.models.gemma3.modeling_gemma3.Gemma3RMSNorm
        )
        monkeypatch.setattr(norm, "forward", _gemma_norm_in_model_dtype)
    m = tiny(name).train()
    longtune.patch(m, attention="s2")
    ids = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(4))
    logits = m(input_ids=ids).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    longtune.train.seco_backward(m, ids, ids, chunk_size=24)
    got = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()
    for n in ref:
        if ref[n].norm() > 0:
            assert float((got[n] - ref[n]).norm() / ref[n].norm()) <= 1e-10, n


@pytest.mark.parametrize("name", NAMES)
def test_patch_survives_save_and_load(name, tmp_path):
    m = tiny(name).train()
    longtune.patch(m, attention="s2", group_size=8)
    x = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(5))
    want = m(x).logits
    m.save_pretrained(tmp_path)
    extra = (
        {"experts_implementation": "eager"} if "experts_implementation" in FAMILIES[name][2] else {}
    )
    m2 = FAMILIES[name][1].from_pretrained(tmp_path, dtype=torch.float64, **extra).train()
    longtune.patch(m2)
    assert torch.equal(m2(x).logits, want)


def test_gemma2_attention_softcap_reaches_the_kernel(monkeypatch):
    # the model's attn_logit_softcapping arrives as the kernel's softcap (and matters: without it
    # the logits differ)
    m = tiny("gemma2")
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(6))
    want = m(x).logits
    seen = []
    orig = longtune.integrations.hf.sparse_attention

    def spy(*a, **kw):
        seen.append(kw.get("softcap"))
        return orig(*a, **kw)

    monkeypatch.setattr(longtune.integrations.hf, "sparse_attention", spy)
    longtune.patch(m, attention="causal")
    torch.testing.assert_close(m(x).logits, want, rtol=TOL["gemma2"], atol=TOL["gemma2"])
    assert seen and all(c == 0.3 for c in seen)
    m.config.attn_logit_softcapping = None
    for layer in m.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert (m(x).logits - want).abs().max() > 1e-5  # 100x the tolerance above


def test_gemma2_final_logit_softcap_reaches_the_fused_ce_head():
    m, ref = tiny("gemma2"), tiny("gemma2")
    longtune.patch(
        ref, attention="causal"
    )  # the same attention on both sides: only the head differs
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    labels = x.clone()
    labels[0, :5] = -100
    logits = ref(x).logits  # transformers applies final_logit_softcapping (0.5) to the logits
    assert float(logits.abs().max()) <= 0.5
    want = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    want.backward()
    longtune.patch(m, attention="causal", lm_head="fused_ce")
    out = m(x, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-10)
    out.loss.backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=n)
    # without the cap the loss differs: the cap is not a no-op here
    m.config.final_logit_softcapping = None
    assert abs(float(m(x, labels=labels).loss) - float(want)) > 1e-3


def test_longlora_names_target_modules_a_model_lacks():
    with pytest.raises(
        ValueError, match=r"\['q_proj', 'k_proj', 'v_proj'\] match no module.*qkv_proj"
    ):
        longtune.recipes.longlora(tiny("phi3"), 256)
    pm, summary = longtune.recipes.longlora(
        tiny("phi3"), 256, target_modules=("qkv_proj", "o_proj")
    )
    assert summary["by_kind"]["lora"] > 0
