"""Seams between features that the system matrix does not reach: model-level entry points given
something that is not a model, S^2-Attn against a KV cache in training, S^2 group size under
chunk-wise training, RoSTE's attention wrapper combined with longtune.patch, and vocabulary heads
the fused loss cannot or can represent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import longtune  # noqa: E402

VOCAB = 128


def _llama(dtype=torch.float64, seed=0, tie=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attention_dropout=0.0,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def _loss64(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _max_rel(a, b):
    return max(float((a[n] - b[n]).norm() / b[n].norm()) for n in b)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: longtune.patch(m, attention="s2"),
        lambda m: longtune.unpatch(m),
        lambda m: longtune.convert_to_sqa(m, 2),
        lambda m: longtune.recipes.longlora(m, 1024),
        lambda m: longtune.train.seco_backward(
            m,
            torch.zeros(1, 8, dtype=torch.long),
            torch.zeros(1, 8, dtype=torch.long),
            chunk_size=4,
        ),
    ],
    ids=["patch", "unpatch", "convert_to_sqa", "longlora", "seco_backward"],
)
def test_model_entry_points_name_what_they_expect(call):
    with pytest.raises(TypeError, match="Hugging Face transformers model.*got Linear"):
        call(nn.Linear(2, 2))


def test_s2_chunkwise_group_size_comes_from_the_whole_sequence():
    """group_size_ratio (no fixed group size) under SeCO: every chunk uses ratio x the sequence
    length, so the gradient is full backprop's."""
    m = _llama().train()
    longtune.patch(m, attention="s2")  # group_size_ratio=0.25 -> G = 32 at N = 128
    ids = torch.randint(0, VOCAB, (1, 128), generator=torch.Generator().manual_seed(1))
    _loss64(m, ids).backward()
    ref = _grads(m)
    m.zero_grad(set_to_none=True)
    longtune.train.seco_backward(m, ids, ids, chunk_size=32)
    assert _max_rel(_grads(m), ref) <= 1e-10


def test_s2_training_against_a_kv_cache_needs_the_sequence_group():
    m = _llama().train()
    longtune.patch(m, attention="s2")
    ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(2))
    cache = DynamicCache()
    with torch.no_grad():
        m(input_ids=ids[:, :32], cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="group size of the whole sequence is unknown"):
            m(input_ids=ids[:, 32:], cache=cache, use_cache=True)
    # a fixed group size makes the chunk's rows those of the whole sequence
    longtune.patch(m, attention="s2", group_size=16)
    cache = DynamicCache()
    with torch.no_grad():
        m(input_ids=ids[:, :32], cache=cache, use_cache=True)
        tail = m(input_ids=ids[:, 32:], cache=cache, use_cache=True).logits
        full = m(input_ids=ids).logits[:, 32:]
    torch.testing.assert_close(tail, full, rtol=1e-12, atol=1e-12)


def test_roste_wrapper_survives_patch_and_unpatch():
    """RoSTE's online R3 + K/V fake-quantization wraps whatever attention runs under it: patching
    after prepare_roste keeps it (the outputs stay RoSTE's), unpatching restores the wrapper over
    the original implementation."""
    m = _llama(torch.float32).eval()
    longtune.quant.prepare_roste(m, w_bits=None, a_bits=None, kv_bits=4)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(input_ids=ids).logits
        longtune.patch(m, attention="causal")
        got = m(input_ids=ids).logits
        assert m.config._attn_implementation == "longtune_roste_longtune"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # dropping the wrapper would drop the K/V quantization: clearly different logits
        for layer in m.model.layers:
            layer.self_attn.longtune_roste["kv_bits"] = None
        assert (m(input_ids=ids).logits - want).abs().max() > 1e-3
        for layer in m.model.layers:
            layer.self_attn.longtune_roste["kv_bits"] = 4
        longtune.unpatch(m)
        assert m.config._attn_implementation == "longtune_roste_sdpa"
        torch.testing.assert_close(m(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_fused_ce_with_a_lora_vocabulary_head_is_exact():
    from peft import LoraConfig, get_peft_model

    m = _llama().train()
    pm = get_peft_model(
        m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "lm_head"])
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    _loss64(pm, ids).backward()
    ref = _grads(pm)
    pm.zero_grad(set_to_none=True)
    longtune.patch(pm, lm_head="fused_ce")
    pm(input_ids=ids, labels=ids).loss.backward()
    assert _max_rel(_grads(pm), ref) <= 1e-10
    assert any("lm_head.lora_A" in n for n in ref)


def test_fused_ce_refuses_heads_it_cannot_represent():
    from peft import LoraConfig, get_peft_model

    m = _llama(torch.float32)
    m.lm_head = longtune.nn.RotatedQuantLinear.from_linear(m.lm_head, act_bits=8, weight_bits=8)
    with pytest.raises(ValueError, match="RotatedQuantLinear"):
        longtune.patch(m, lm_head="fused_ce")
    m = _llama(torch.float32).train()
    pm = get_peft_model(m, LoraConfig(r=4, lora_dropout=0.1, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="LoRA dropout"):
        longtune.patch(pm, lm_head="fused_ce")
