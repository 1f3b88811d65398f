"""Model-level RoSTE on tiny random Hugging Face Llama / Qwen2 models: norm folding + R1/R2/R4
merges preserve the function, QAT trains, the rotation search decides by the numbers, export ->
load reproduces the fake-quant model exactly."""

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longtune  # noqa: E402
from longtune.integrations import quant as RS  # noqa: E402
from longtune.quant import RoSTEConfig, export, load_exported, prepare_roste, search_rotation_config  # noqa: E402


def tiny(kind="llama", attn="sdpa", dtype=torch.float64, tie=True, inter=96, seed=0):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=inter,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=tie,
            attn_implementation=attn,
        )
        m = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=inter,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=tie,
            attn_implementation=attn,
        )
        m = transformers.Qwen2ForCausalLM(cfg)
    for mod in m.modules():  # non-trivial norm weights, so that folding is exercised
        if "RMSNorm" in type(mod).__name__:
            torch.nn.init.uniform_(mod.weight, 0.5, 1.5)
    return m.to(dtype).eval()


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("inter", [96, 128])  # 96 = 12 * 8: R4 with a Paley factor
def test_rotations_preserve_the_function(kind, attn, inter):
    m = tiny(kind, attn, inter=inter)
    ref = m(IDS).logits
    p = prepare_roste(copy.deepcopy(m), w_bits=None, a_bits=None, kv_bits=None)
    assert p.config._attn_implementation == f"longtune_roste_{attn}"
    assert isinstance(p.model.layers[0].mlp.down_proj, longtune.nn.RotatedQuantLinear)
    # HF's RMSNorm computes in float32 even for a float64 model: ~1e-7 is its rounding
    torch.testing.assert_close(p(IDS).logits, ref, rtol=0, atol=1e-5)


def test_merges_without_r1_are_exact_in_float64():
    m = tiny()
    ref = m(IDS).logits
    p = prepare_roste(copy.deepcopy(m), w_bits=None, a_bits=None, kv_bits=None, r1=False)
    torch.testing.assert_close(p(IDS).logits, ref, rtol=0, atol=1e-12)


def test_quantized_model_is_close_and_trains():
    m = tiny(dtype=torch.float32)
    ref = m(IDS).logits
    p = prepare_roste(copy.deepcopy(m), w_bits=8, a_bits=8, kv_bits=8)
    rel = ((p(IDS).logits - ref).norm() / ref.norm()).item()
    assert rel < 0.05
    q = prepare_roste(copy.deepcopy(m)).train()  # W4A4KV4
    opt = torch.optim.Adam([t for t in q.parameters() if t.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        out = q(IDS, labels=IDS)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]


def test_per_layer_rotation_config_is_respected():
    m = tiny(dtype=torch.float32)
    cfg = RoSTEConfig(layers={"0": {"r2": False, "r3": False, "r4": False}})
    p = prepare_roste(copy.deepcopy(m), RoSTEConfig.from_json(cfg.to_json()))
    assert not p.model.layers[0].mlp.down_proj.rotate and p.model.layers[1].mlp.down_proj.rotate
    assert p.model.layers[0].self_attn.longtune_roste["r3"] is False
    assert p.model.layers[1].self_attn.longtune_roste["r3"] is True


def test_search_decides_by_the_numbers(tmp_path):
    m = tiny(dtype=torch.float32)
    with torch.no_grad():
        # a moderate outlier channel into layer 0's down_proj: it sets the per-token activation
        # scale and crushes the other channels unless rotated away (measured: ~0.018 vs ~0.053)
        m.model.layers[0].mlp.up_proj.weight[5] *= 10
    calib = [
        torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    cfg = search_rotation_config(m, calib, n_samples=8, save_to=str(tmp_path / "rot.json"))
    saved = json.loads((tmp_path / "rot.json").read_text())
    assert saved["layers"] == json.loads(cfg.to_json())["layers"]
    for d in cfg.layers.values():
        for r in ("r2", "r3", "r4"):
            e = d["errors"][r]
            assert d[r] == (e["with"] < e["without"])
    assert cfg.layers["0"]["r4"] is True
    # the opposite construction: an outlier that hardly reaches the output - spreading it by the
    # rotation costs more than it saves, and the search keeps R4 off
    m2 = tiny(dtype=torch.float32)
    with torch.no_grad():
        m2.model.layers[0].mlp.up_proj.weight[5] *= 200
        m2.model.layers[0].mlp.down_proj.weight[:, 5] /= 200
    assert search_rotation_config(m2, calib, n_samples=8).layers["0"]["r4"] is False
    prepare_roste(m, cfg)  # the saved configuration is accepted by training


def test_linear_error_prefers_no_rotation_on_grid_data():
    # activations and weights already on the 4-bit grid: no rotation is exact, a rotation is not
    cfg = RoSTEConfig()
    x = torch.randint(-7, 8, (32, 64)).double()
    x[:, 0] = 7
    w = torch.randint(-7, 8, (16, 64)).double()
    w[:, 0] = 7
    assert RS._linear_error(x, w, None, cfg) == 0.0
    assert RS._linear_error(x, w, RS._had, cfg) > 0.0


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("group", [None, 32])
def test_export_then_load_reproduces_outputs(tmp_path, kind, group):
    m = tiny(kind, dtype=torch.float32)
    p = prepare_roste(copy.deepcopy(m), w_group_size=group)
    with torch.no_grad():
        expect = p(IDS).logits
    info = export(p, str(tmp_path / "model.safetensors"))
    assert info["quantized_layers"] == 2 * 7
    n_weights = sum(mod.weight.numel() for mod in RS._quant_linears(p).values())
    assert info["packed_weight_bytes"] == n_weights // 2  # two 4-bit codes per byte
    fresh = tiny(kind, dtype=torch.float32, seed=123)  # different random weights
    load_exported(fresh, str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        got = fresh(IDS).logits
    assert torch.equal(got, expect)


def test_pack_roundtrip():
    for bits, sym in [(4, True), (4, False), (8, True), (8, False), (2, True), (3, False)]:
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
        codes = torch.randint(lo, hi + 1, (7, 5))
        assert torch.equal(RS._unpack(RS._pack(codes, bits), bits, codes.shape, sym), codes)


def test_bad_input():
    with pytest.raises(TypeError, match="expected a Hugging Face"):
        prepare_roste(torch.nn.Linear(4, 4))
    m = tiny(dtype=torch.float32)
    with pytest.raises(TypeError, match="unknown option 'bitz'"):
        prepare_roste(copy.deepcopy(m), bitz=4)
    p = prepare_roste(copy.deepcopy(m))
    with pytest.raises(RuntimeError, match="already prepared"):
        prepare_roste(p)
    with pytest.raises(ValueError, match="not prepared"):
        export(m, "/tmp/never.safetensors")
    with pytest.raises(ValueError, match="gave no samples"):
        search_rotation_config(copy.deepcopy(m), [])


def test_peft_lora_on_prepared_model():
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # quantized: LoRA trains on top of the fake-quantized projections
    q = prepare_roste(tiny(dtype=torch.float32))
    pm = peft.get_peft_model(q, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    opt = torch.optim.AdamW([t for t in pm.parameters() if t.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = pm(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # quantizers off: merging the LoRA deltas into the (online-rotated) weights keeps the function
    f = prepare_roste(tiny(dtype=torch.float64), w_bits=None, a_bits=None, kv_bits=None)
    pf = peft.get_peft_model(
        f, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    with torch.no_grad():
        before = pf(IDS).logits
        merged = pf.merge_and_unload()
        torch.testing.assert_close(merged(IDS).logits, before, rtol=0, atol=1e-9)
