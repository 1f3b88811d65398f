"""``longtune.apply(model, *configs)``: every config alone, supported combinations (SeCO through the
applied config equals full backprop), every refused combination raising before the model is
touched or run, idempotence, and the recorded setup restored after ``save_pretrained`` ->
``from_pretrained`` in a fresh process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import longtune  # noqa: E402
from longtune.config import (  # noqa: E402
    AttentionConfig,
    ChunkwiseConfig,
    FusedCrossEntropyConfig,
    LongLoRAConfig,
    RoSTEConfig,
    S2FTConfig,
    SparseDeltaConfig,
)

VOCAB, N = 128, 64


def _tiny(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype).train()


def _ids(seed=5):
    return torch.randint(0, VOCAB, (2, N), generator=torch.Generator().manual_seed(seed))


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        repr(model),
        json.dumps(model.config.to_dict(), sort_keys=True, default=str),
    )


def _same(a, b):
    assert a[1] == b[1] and a[2] == b[2]
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k


ALONE = {
    "attention_s2": [AttentionConfig(kind="s2", group_size_ratio=0.5)],
    "attention_causal": [AttentionConfig(kind="causal")],
    "attention_lambda": [AttentionConfig(kind="lambda", window=16, n_global=2)],
    "fused_ce": [FusedCrossEntropyConfig()],
    "longlora": [LongLoRAConfig(target_context=256, lora_r=4)],
    "sparse": [SparseDeltaConfig(density=0.1, seed=0)],
    "s2ft": [S2FTConfig(head_ratio=0.5, channel_ratio=0.25)],
    "roste": [RoSTEConfig(w_bits=None, a_bits=None, kv_bits=None)],
    "chunkwise": [ChunkwiseConfig(chunk_size=16)],
}


@pytest.mark.parametrize("name", list(ALONE))
def test_each_config_alone_applies_records_and_is_idempotent(name):
    configs = ALONE[name]
    m = longtune.apply(_tiny(), *configs)
    rec = m.config.longtune_apply
    json.dumps(rec)  # JSON-serialisable
    kinds = [r["type"] for r in rec]
    assert type(configs[0]).__name__ in kinds
    if name == "longlora":
        assert kinds == ["LongLoRAConfig", "AttentionConfig"]  # LongLoRA brings S^2-Attn
        assert hasattr(m, "peft_config")
    assert [dataclasses.asdict(c) for c in longtune.config.applied(m)] == [
        dataclasses.asdict(c) for c in longtune.config.applied(m)
    ]
    ids = _ids()
    if name == "attention_lambda":
        m.eval()
    with torch.no_grad():
        out = m(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    before = _snapshot(m)
    again = longtune.apply(m, *configs)
    assert again is m
    _same(before, _snapshot(m))
    assert longtune.apply(m) is m  # re-applying the record changes nothing either
    _same(before, _snapshot(m))
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids, labels=ids).loss, out.loss)


def test_family_functions_stay_and_share_the_config_type():
    assert longtune.quant.RoSTEConfig is longtune.config.RoSTEConfig
    m = _tiny()
    longtune.patch(m, attention="s2")
    assert m.config.longtune_patch["attention"] == "s2"


def _seco_vs_full(model, chunk):
    ids = _ids()
    labels = ids.clone()
    labels[:, :7] = -100
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=labels).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    longtune.integrations.apply.chunkwise_backward(model, ids, labels)
    assert ref
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(
                p.grad, ref[n], rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}"
            )


@pytest.mark.parametrize("trainable", ["full", "longlora", "sparse", "s2ft", "roste"])
def test_supported_combinations_train_chunkwise_like_full_backprop(trainable):
    extra = {
        "full": [],
        "longlora": [LongLoRAConfig(target_context=256, lora_r=4)],
        "sparse": [SparseDeltaConfig(density=0.1, seed=0)],
        "s2ft": [S2FTConfig(head_ratio=0.5, channel_ratio=0.25)],
        "roste": [
            RoSTEConfig(w_bits=None, a_bits=None, kv_bits=None),
            LongLoRAConfig(target_context=256, lora_r=4),
        ],
    }[trainable]
    m = longtune.apply(
        _tiny(),
        AttentionConfig(kind="s2", group_size_ratio=0.25),
        FusedCrossEntropyConfig(),
        ChunkwiseConfig(chunk_size=16),
        *extra,
    )
    with torch.no_grad():  # LoRA B / sparse deltas start at zero: give them values so they matter
        for n, p in m.named_parameters():
            if "lora_B" in n or n.endswith("values"):
                p.copy_(
                    0.05
                    * torch.randn(
                        p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(1)
                    )
                )
    _seco_vs_full(m, 16)


def _roste_head_model():
    m = _tiny(dtype=torch.float32)
    m.lm_head = longtune.nn.RotatedQuantLinear.from_linear(m.lm_head, act_bits=8, weight_bits=8)
    return m


REFUSED = {
    "lambda_chunkwise": (
        lambda: _tiny(),
        [AttentionConfig(kind="lambda"), ChunkwiseConfig(chunk_size=16)],
        "inference only",
    ),
    "lambda_longlora": (
        lambda: _tiny(),
        [AttentionConfig(kind="lambda"), LongLoRAConfig(target_context=256)],
        "inference only",
    ),
    "lambda_sparse": (
        lambda: _tiny(),
        [AttentionConfig(kind="lambda"), SparseDeltaConfig()],
        "inference only",
    ),
    "lambda_s2ft": (
        lambda: _tiny(),
        [AttentionConfig(kind="lambda"), S2FTConfig()],
        "inference only",
    ),
    "roll_chunkwise": (
        lambda: _tiny(),
        [AttentionConfig(kind="s2", s2_mode="longlora_roll"), ChunkwiseConfig(chunk_size=16)],
        "longlora_roll",
    ),
    "fused_ce_quantized_head": (
        _roste_head_model,
        [FusedCrossEntropyConfig()],
        "RotatedQuantLinear",
    ),
    "fused_ce_lora_head_dropout": (
        lambda: _tiny(),
        [
            FusedCrossEntropyConfig(),
            LongLoRAConfig(
                target_context=256, lora_dropout=0.1, target_modules=("q_proj", "lm_head")
            ),
        ],
        "LoRA dropout",
    ),
    "fused_ce_lora_head_dora": (
        lambda: _tiny(),
        [
            FusedCrossEntropyConfig(),
            LongLoRAConfig(target_context=256, use_dora=True, target_modules=("q_proj", "lm_head")),
        ],
        "DoRA",
    ),
    "two_trainables": (
        lambda: _tiny(),
        [SparseDeltaConfig(), S2FTConfig()],
        "both choose the trainable",
    ),
    "roste_sparse": (
        lambda: _tiny(),
        [RoSTEConfig(), SparseDeltaConfig()],
        "RoSTEConfig with SparseDeltaConfig",
    ),
    "roste_s2ft": (lambda: _tiny(), [RoSTEConfig(), S2FTConfig()], "RoSTEConfig with S2FTConfig"),
    "duplicate": (
        lambda: _tiny(),
        [ChunkwiseConfig(chunk_size=8), ChunkwiseConfig(chunk_size=16)],
        "given twice",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_combinations_raise_before_the_model_is_touched(name):
    make, configs, match = REFUSED[name]
    m = make()
    before = _snapshot(m)

    def no_compute(*a, **k):
        raise AssertionError("the model ran before the combination was refused")

    hooks = [mod.register_forward_pre_hook(no_compute) for mod in m.modules()]
    with pytest.raises(ValueError, match=match):
        longtune.apply(m, *configs)
    for h in hooks:
        h.remove()
    _same(before, _snapshot(m))


def test_refused_when_the_model_already_carries_a_conflicting_setup():
    m = longtune.apply(_tiny(), AttentionConfig(kind="s2", s2_mode="longlora_roll"))
    with pytest.raises(ValueError, match="longlora_roll"):
        longtune.apply(m, ChunkwiseConfig(chunk_size=16))
    m = longtune.apply(_tiny(), SparseDeltaConfig(density=0.1, seed=0))
    with pytest.raises(
        ValueError, match="already has SparseDeltaConfig applied with other settings"
    ):
        longtune.apply(m, SparseDeltaConfig(density=0.2, seed=0))
    # a runtime config is replaced
    m = longtune.apply(_tiny(), AttentionConfig(kind="s2"))
    longtune.apply(m, AttentionConfig(kind="causal"))
    assert m.config.longtune_patch["attention"] == "causal"
    assert [r["kind"] for r in m.config.longtune_apply if r["type"] == "AttentionConfig"] == [
        "causal"
    ]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: AttentionConfig(kind="sliding"), "AttentionConfig: kind"),
        (lambda: AttentionConfig(group_size_ratio=0), "AttentionConfig: group_size_ratio"),
        (lambda: AttentionConfig(s2_mode="roll"), "AttentionConfig: s2_mode"),
        (lambda: ChunkwiseConfig(), "ChunkwiseConfig: chunk_size"),
        (
            lambda: ChunkwiseConfig(method="spaco", chunk_size=8),
            "ChunkwiseConfig: method='spaco' needs budget",
        ),
        (lambda: ChunkwiseConfig(chunk_size=8, budget=2), "ChunkwiseConfig: method='seco'"),
        (lambda: ChunkwiseConfig(method="sgd", chunk_size=8), "ChunkwiseConfig: method"),
        (lambda: LongLoRAConfig(), "LongLoRAConfig: target_context"),
        (lambda: SparseDeltaConfig(density=0), "SparseDeltaConfig: density"),
        (lambda: SparseDeltaConfig(update_every=4, window=5), "SparseDeltaConfig: window"),
        (lambda: S2FTConfig(head_ratio=2), "S2FTConfig: head_ratio"),
    ],
)
def test_bad_config_values_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_apply_names_what_it_expects():
    with pytest.raises(TypeError, match="Hugging Face transformers model"):
        longtune.apply(torch.nn.Linear(2, 2), AttentionConfig())
    with pytest.raises(TypeError, match="expected configs from longtune.config"):
        longtune.apply(_tiny(), {"kind": "s2"})
    with pytest.raises(ValueError, match="carries no recorded configs"):
        longtune.apply(_tiny())


WORKER = textwrap.dedent("""
    import sys, torch, longtune
    from transformers import LlamaForCausalLM
    path, out = sys.argv[1], sys.argv[2]
    m = longtune.apply(LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float64))
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(5))
    m.eval()
    with torch.no_grad():
        logits = m(input_ids=ids).logits
    m.train()
    loss = m(input_ids=ids, labels=ids).loss
    m.zero_grad(set_to_none=True)
    chunked = longtune.integrations.apply.chunkwise_backward(m, ids, ids)
    torch.save({"logits": logits, "loss": loss.detach(), "chunked": chunked,
                "patch": m.config.longtune_patch, "impl": m.config._attn_implementation,
                "grads": {n: p.grad for n, p in m.named_parameters()}}, out)
""")


def test_save_pretrained_from_pretrained_apply_restores_the_setup_in_a_fresh_process(tmp_path):
    m = longtune.apply(
        _tiny(),
        AttentionConfig(kind="s2", group_size_ratio=0.5),
        FusedCrossEntropyConfig(),
        ChunkwiseConfig(chunk_size=16),
    )
    m.save_pretrained(tmp_path / "model")
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    res = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "worker.py"),
            str(tmp_path / "model"),
            str(tmp_path / "there.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    there = torch.load(tmp_path / "there.pt")
    ids = _ids()
    m.eval()
    with torch.no_grad():
        logits = m(input_ids=ids).logits
    m.train()
    loss = m(input_ids=ids, labels=ids).loss
    m.zero_grad(set_to_none=True)
    chunked = longtune.integrations.apply.chunkwise_backward(m, ids, ids)
    assert there["impl"] == m.config._attn_implementation == "longtune_s2"
    assert there["patch"] == m.config.longtune_patch
    assert torch.equal(there["logits"], logits)
    assert torch.equal(there["loss"], loss.detach())  # the fused loss (no logits) in training
    assert torch.equal(there["chunked"], chunked)
    for n, p in m.named_parameters():
        assert torch.equal(there["grads"][n], p.grad), n
