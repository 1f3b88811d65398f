"""Model state is data: every piece of state that sparse-delta (SpIEL), S²FT and RoSTE training
produces survives save -> load -> resume bit for bit (torch.equal, float64 and float32): module
state dicts at any point of training, optimizer and SpIEL schedule state, sparse adapters,
merge-and-unload to a plain transformers model, and transformers ``Trainer`` checkpoints. The
loading side runs in a fresh Python process wherever a file is involved."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import longtune
from longtune.nn import RotatedQuantLinear, S2FTLinear, SparseDeltaLinear

transformers = pytest.importorskip("transformers")

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)

# shared by this file and the fresh processes it starts
PRELUDE = f"""
import json, os, sys, warnings
warnings.filterwarnings("ignore")
import torch
import longtune
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error()
TINY = {TINY!r}

def tiny_llama(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).to(dtype)

def train_steps(model, opt, sched, batches):
    losses = []
    for ids in batches:
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses

def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (2, 12), generator=g) for _ in range(n)]
"""
exec(PRELUDE)  # noqa: S102  (tiny_llama, train_steps, batches)


def run_fresh(tmp_path, body: str, name: str = "fresh"):
    """Run PRELUDE + body in a new Python process (cwd = tmp_path); return what it json-dumped to
    out.json."""
    script = tmp_path / f"{name}.py"
    script.write_text(
        PRELUDE
        + "\nOUT = {}\n"
        + textwrap.dedent(body)
        + "\njson.dump(OUT, open('out.json', 'w'))\n"
    )
    # the same thread count as this process: CPU kernels split their reductions by thread
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS=str(torch.get_num_threads()))
    r = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, f"fresh process failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return json.loads((tmp_path / "out.json").read_text())


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ SparseDeltaLinear
def _sparse_at(point: str, dtype):
    """A SparseDeltaLinear (16 -> 8, density 0.25) at a point of training, and its original
    weight."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).to(dtype)
    w0 = lin.weight.detach().clone()
    m = SparseDeltaLinear(lin, density=0.25, seed=0)
    if point == "before_forward":
        with torch.no_grad():
            m.values.normal_()
        return m, w0
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x, y = torch.randn(32, 16, dtype=dtype), torch.randn(32, 8, dtype=dtype)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if point == "merged":
        m.merge()
        with torch.no_grad():
            m.values.normal_()  # and trained on after the merge
    elif point == "regrown":
        keep = torch.ones(m.values.numel(), dtype=torch.bool)
        keep[::3] = False
        free = torch.tensor(
            [i for i in range(128) if i not in set(m.indices.tolist())][: int((~keep).sum())]
        )
        m.replace_deltas(keep, free, opt)
        with torch.no_grad():
            m.values.add_(0.25)
    return m, w0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("point", ["before_forward", "trained", "merged", "regrown"])
def test_sparse_delta_state_dict_holds_the_base_weight_and_reloads_exactly(point, dtype):
    m, w0 = _sparse_at(point, dtype)
    x = torch.randn(5, 16, dtype=dtype)
    with torch.no_grad():
        expect = m(x)
    sd = roundtrip(m.state_dict())
    assert {"base.weight", "base.bias", "indices", "values"} <= set(sd)
    assert ("folded" in sd) == (point == "merged")
    base = w0.clone()
    if point == "merged":
        base.view(-1)[sd["indices"]] += sd["folded"]
    assert torch.equal(
        sd["base.weight"], base
    )  # without the deltas: applying them once gives the layer
    fresh = SparseDeltaLinear(torch.nn.Linear(16, 8).to(dtype), density=0.25, seed=123)
    values = fresh.values
    assert fresh.load_state_dict(sd) is not None
    assert fresh.values is values  # an optimizer built over the fresh module stays attached
    with torch.no_grad():
        assert torch.equal(fresh(x), expect)
    assert states_equal(roundtrip(fresh.state_dict()), sd)
    if point == "merged":
        m.unmerge()
        fresh.unmerge()
        with torch.no_grad():
            assert torch.equal(fresh(x), m(x))
    # and again into a module with another number of deltas
    other = SparseDeltaLinear(torch.nn.Linear(16, 8).to(dtype), num_deltas=3, seed=1)
    other.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(other(x), expect)


def test_sparse_delta_state_dict_through_safetensors_and_bad_input(tmp_path):
    from safetensors.torch import load_file, save_file

    m, _ = _sparse_at("trained", torch.float32)
    save_file(m.state_dict(), str(tmp_path / "m.safetensors"))
    fresh = SparseDeltaLinear(torch.nn.Linear(16, 8), density=0.25, seed=9)
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
    bad = m.state_dict()
    bad["indices"] = bad["indices"].flip(0)
    with pytest.raises(RuntimeError, match="indices must be strictly increasing"):
        fresh.load_state_dict(bad)
    bad = m.state_dict()
    bad["indices"] = bad["indices"] + 1000
    with pytest.raises(RuntimeError, match="out of range"):
        fresh.load_state_dict(bad)
    with (
        torch.no_grad()
    ):  # a failed load leaves the module usable and unchanged in what it computes
        assert torch.equal(fresh(x), m(x))
    only_values = {k: v for k, v in m.state_dict().items() if k != "indices"}
    with pytest.raises(RuntimeError, match="loaded together"):
        fresh.load_state_dict(only_values)


def test_sparse_delta_partial_loads_keep_the_base():
    """Loading only the deltas (strict=False) keeps the module's own base weight; loading only the
    base weight keeps the deltas."""
    m, w0 = _sparse_at("trained", torch.float64)
    sd = m.state_dict()
    fresh = SparseDeltaLinear(torch.nn.Linear(16, 8).double(), density=0.25, seed=4)
    with torch.no_grad():
        fresh.values.normal_()
    fresh(torch.randn(2, 16, dtype=torch.float64))  # patched with its own deltas
    own_base = fresh.base_weight()
    fresh.load_state_dict({"indices": sd["indices"], "values": sd["values"]}, strict=False)
    assert torch.equal(fresh.base_weight(), own_base)
    fresh.load_state_dict(
        {"base.weight": sd["base.weight"], "base.bias": sd["base.bias"]}, strict=False
    )
    x = torch.randn(4, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_sparse_delta_dtype_conversion_after_training():
    """.to(dtype) after forwards converts the base weight without the deltas; the state dict and
    the outputs follow the converted module."""
    m, w0 = _sparse_at("trained", torch.float32)
    m.double()
    sd = m.state_dict()
    assert sd["base.weight"].dtype == torch.float64 and torch.equal(sd["base.weight"], w0.double())
    x = torch.randn(3, 16, dtype=torch.float64)
    expect = torch.nn.functional.linear(
        x,
        w0.double().reshape(-1).index_add(0, m.indices, m.values.detach()).reshape(8, 16),
        m.base.bias,
    )
    with torch.no_grad():
        assert torch.equal(m(x), expect)


# ------------------------------------------------------------------ S2FT, RoSTE modules
def test_s2ft_linear_state_dict_saves_through_safetensors_with_its_adapter(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    for dim in ("out", "in"):
        m = S2FTLinear(torch.nn.Linear(12, 10).double(), 2, 5, dim)
        with torch.no_grad():
            m.part.add_(torch.randn_like(m.part))
        path = str(tmp_path / f"s2ft_{dim}.safetensors")
        save_file(m.state_dict(), path)  # no tensor in it shares storage with another
        fresh = S2FTLinear(torch.nn.Linear(12, 10).double(), 2, 5, dim)
        fresh.load_state_dict(load_file(path))
        x = torch.randn(4, 12, dtype=torch.float64)
        with torch.no_grad():
            assert torch.equal(fresh(x), m(x))
        assert torch.equal(fresh.adapter(), m.adapter())
        assert states_equal(fresh.state_dict(), m.state_dict())
        with torch.no_grad():  # the block is still the weight's own storage
            fresh.part.add_(1.0)
        assert torch.equal(fresh._block(), fresh.part.detach())
        assign = S2FTLinear(torch.nn.Linear(12, 10).double(), 2, 5, dim)
        assign.load_state_dict(load_file(path), assign=True)
        assert assign.part.data_ptr() == assign._block().data_ptr()
        with torch.no_grad():
            assert torch.equal(assign(x), m(x))


def test_chunked_lm_head_class_weight_saved_and_loaded_in_a_fresh_process(tmp_path):
    # the per-class loss weights are state: saved with the head, loaded in a new process, the
    # same loss bit for bit
    torch.manual_seed(3)
    lin = torch.nn.Linear(16, 40, dtype=torch.float64)
    head = longtune.nn.ChunkedLMHead(lin, class_weight=torch.rand(40, dtype=torch.float64))
    h = torch.randn(2, 9, 16, dtype=torch.float64)
    labels = torch.randint(0, 40, (2, 9))
    torch.save({"state": head.state_dict(), "h": h, "labels": labels}, tmp_path / "head.pt")
    out = run_fresh(
        tmp_path,
        """
        blob = torch.load("head.pt", weights_only=True)
        lin = torch.nn.Linear(16, 40, dtype=torch.float64)
        head = longtune.nn.ChunkedLMHead(lin, class_weight=torch.ones(40, dtype=torch.float64))
        head.load_state_dict(blob["state"])
        OUT["loss"] = head(blob["h"], blob["labels"]).item().hex()
        OUT["weight"] = head.class_weight.tolist()
        """,
    )
    assert float.fromhex(out["loss"]) == head(h, labels).item()
    assert out["weight"] == head.class_weight.tolist()


def test_rotated_quant_linear_state_dict_carries_its_quantizer():
    torch.manual_seed(0)
    m = RotatedQuantLinear(
        64,
        16,
        act_bits=8,
        weight_bits=4,
        weight_group_size=32,
        act_clip_ratio=0.9,
        weight_symmetric=False,
        ste="clip",
    )
    m.prerotated_weight, m.weight_is_quantized = True, True
    sd = roundtrip(m.state_dict())
    fresh = RotatedQuantLinear(64, 16)
    fresh.load_state_dict(sd)
    for k in RotatedQuantLinear._STATE_FIELDS:
        assert getattr(fresh, k) == getattr(m, k), k
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), m(x))


# --------------------------------------------------------------- optimizer + SpIEL schedule, resume
def _spiel(seed, optimizer, growth, dtype):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(24, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)
    ).to(dtype)
    longtune.sparsify(model, density=0.1, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        longtune.train.SparseAdamW(params, lr=1e-2, weight_decay=0.01)
        if optimizer == "sparse"
        else torch.optim.AdamW(params, lr=1e-2)
    )
    sched = longtune.train.SpIELScheduler(
        model,
        opt,
        update_every=4,
        window=2,
        drop_fraction=0.3,
        total_steps=20,
        growth=growth,
        tile_rows=5,
    )
    return model, opt, sched


def _spiel_train(model, opt, sched, steps, start=0, dtype=torch.float64):
    losses = []
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + s)
        x, y = (
            torch.randn(16, 24, generator=g, dtype=dtype),
            torch.randn(16, 8, generator=g, dtype=dtype),
        )
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimizer,dtype", [("sparse", torch.float32), ("torch", torch.float64)])
@pytest.mark.parametrize("growth", ["ag", "ma"])
@pytest.mark.parametrize(
    "stop", [7, 8]
)  # 7: inside a growth window (stats collected); 8: right after a regrow
def test_spiel_resume_is_bit_exact(optimizer, dtype, growth, stop):
    total = 13
    model, opt, sched = _spiel(0, optimizer, growth, dtype)
    expect = _spiel_train(model, opt, sched, total, dtype=dtype)
    final = model.state_dict()

    model, opt, sched = _spiel(0, optimizer, growth, dtype)
    first = _spiel_train(model, opt, sched, stop, dtype=dtype)
    if growth == "ag" and stop == 7:
        assert any(l._collect is not None and l._collect.cand is not None for l in sched.layers)
    saved = roundtrip(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    )

    model, opt, sched = _spiel(5, optimizer, growth, dtype)  # other weights, other initial indices
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    rest = _spiel_train(model, opt, sched, total - stop, start=stop, dtype=dtype)
    assert first + rest == expect
    assert states_equal(model.state_dict(), final)
    if optimizer == "sparse":
        st = next(iter(opt.state.values()))
        assert st["exp_avg"].dtype == torch.float32 and st["age"].dtype == torch.int32


# ------------------------------------------------------------------ sparse Llama: fresh process
def test_sparse_llama_resume_adapter_and_merge_in_a_fresh_process(tmp_path):
    """float64 tiny Llama, SpIEL with torch AdamW: model / optimizer / schedule state saved at step
    5 (inside a growth window, after a regrow at 4) resume in a fresh process exactly; the sparse
    adapter loads onto the base model; the merged plain model loads with from_pretrained."""
    data = batches(9)
    base = tiny_llama(0)
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    longtune.sparsify(model, density=0.05, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = longtune.train.SpIELScheduler(model, opt, update_every=4, window=2, drop_fraction=0.5)
    losses = train_steps(model, opt, sched, data[:5])
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
        tmp_path / "state.pt",
    )
    longtune.train.save_sparse_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        logits = model(data[0]).logits
    torch.save(logits, tmp_path / "logits.pt")
    merged = longtune.train.merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, SparseDeltaLinear) for m in merged.modules())
    with torch.no_grad():
        assert torch.equal(merged(data[0]).logits, logits)
    merged.save_pretrained(tmp_path / "merged")
    losses += train_steps(model, opt, sched, data[5:])

    cfg = json.loads((tmp_path / "adapter" / "sparse_adapter_config.json").read_text())
    assert (
        cfg["format"] == "longtune.sparse_delta"
        and cfg["format_version"] == 1
        and cfg["dtype"] == "float64"
    )
    assert len(cfg["target_modules"]) == 2 * 7 + 1 and cfg["modules"]["lm_head"]["shape"] == [
        128,
        32,
    ]

    out = run_fresh(
        tmp_path,
        """
        data = batches(9)
        st = torch.load("state.pt", weights_only=True)
        model = LlamaForCausalLM.from_pretrained("base", dtype=torch.float64)
        longtune.sparsify(model, density=0.05, seed=1)   # other initial indices
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        sched = longtune.train.SpIELScheduler(model, opt, update_every=4, window=2,
                                              drop_fraction=0.5)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        logits = torch.load("logits.pt", weights_only=True)
        with torch.no_grad():
            OUT["state_dict_logits"] = torch.equal(model(data[0]).logits, logits)
        OUT["resumed"] = train_steps(model, opt, sched, data[5:])

        fresh = LlamaForCausalLM.from_pretrained("base", dtype=torch.float64)
        longtune.train.load_sparse_adapter(fresh, "adapter")
        with torch.no_grad():
            OUT["adapter_logits"] = torch.equal(fresh(data[0]).logits, logits)
        OUT["adapter_trainable"] = sorted({n.rsplit(".", 1)[-1] for n, p in fresh.named_parameters()
                                           if p.requires_grad})

        plain = LlamaForCausalLM.from_pretrained("merged", dtype=torch.float64)
        OUT["merged_is_plain"] = all(type(m) is torch.nn.Linear for n, m in plain.named_modules()
                                     if n.endswith(("proj", "lm_head")))
        with torch.no_grad():
            OUT["merged_logits"] = torch.equal(plain(data[0]).logits, logits)
    """,
    )
    assert out["state_dict_logits"]
    assert losses[5:] == out["resumed"]
    assert out["adapter_logits"] and out["adapter_trainable"] == ["values"]
    assert out["merged_is_plain"] and out["merged_logits"]


def test_sparse_adapter_refuses_a_mismatched_base(tmp_path):
    model = tiny_llama(0)
    longtune.sparsify(model, density=0.05, seed=0, target_modules=["q_proj", "down_proj"])
    longtune.train.save_sparse_adapter(model, tmp_path / "a")
    wide = (
        tiny_llama(0)
        .__class__(transformers.LlamaConfig(**dict(TINY, intermediate_size=96)))
        .double()
    )
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.mlp\.down_proj' has a weight of shape \[32, 96\]"
    ):
        longtune.train.load_sparse_adapter(wide, tmp_path / "a")
    assert states_equal(wide.state_dict(), before)  # checked before anything changed
    assert not any(isinstance(m, SparseDeltaLinear) for m in wide.modules())
    shallow = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**dict(TINY, num_hidden_layers=1))
    ).double()
    with pytest.raises(
        ValueError, match=r"module 'model\.layers\.1\.self_attn\.q_proj', which the model"
    ):
        longtune.train.load_sparse_adapter(shallow, tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError, match="sparse_adapter_config.json not found"):
        longtune.train.load_sparse_adapter(model, tmp_path / "b")
    cfg = json.loads((tmp_path / "a" / "sparse_adapter_config.json").read_text())
    (tmp_path / "a" / "sparse_adapter_config.json").write_text(
        json.dumps(dict(cfg, format_version=99))
    )
    with pytest.raises(ValueError, match="format version 99 is newer"):
        longtune.train.load_sparse_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="no SparseDeltaLinear"):
        longtune.train.save_sparse_adapter(tiny_llama(0), tmp_path / "c")


def test_merge_and_unload_refuses_rotated_quant_layers():
    from longtune.quant import prepare_roste

    model = prepare_roste(tiny_llama(0, torch.float32), w_bits=None, a_bits=None, kv_bits=None)
    with pytest.raises(ValueError, match="RotatedQuantLinear"):
        longtune.train.merge_and_unload(model)


# -------------------------------------------------------------- S2FT and RoSTE Llama: fresh process
def test_s2ft_and_roste_llama_state_in_a_fresh_process(tmp_path):
    from safetensors.torch import save_file

    from longtune.quant import export, load_exported, prepare_roste
    from longtune.train.s2ft import select_and_permute

    data = batches(4)
    # S2FT (fused MLPs), float64, AdamW
    s2 = tiny_llama(0)
    select_and_permute(s2, head_ratio=0.5, channel_ratio=0.25, seed=0)
    opt = torch.optim.AdamW([p for p in s2.parameters() if p.requires_grad], lr=1e-2)
    train_steps(s2, opt, None, data[:2])
    save_file(s2.state_dict(), str(tmp_path / "s2ft.safetensors"))
    torch.save(opt.state_dict(), tmp_path / "s2ft_opt.pt")
    with torch.no_grad():
        torch.save(s2(data[0]).logits, tmp_path / "s2ft_logits.pt")
    plain = longtune.train.merge_and_unload(copy.deepcopy(s2))
    assert not any(isinstance(m, (S2FTLinear, longtune.nn.S2FTMLP)) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(data[0]).logits, s2(data[0]).logits)
    plain.save_pretrained(tmp_path / "s2ft_merged")
    s2_next = train_steps(s2, opt, None, data[2:])
    adapter = s2.model.layers[1].mlp.up_proj.adapter()
    # RoSTE, float32: trained fake-quant model, and a model loaded from its integer export
    rq = prepare_roste(tiny_llama(0, torch.float32), w_bits=4, a_bits=8, kv_bits=8, w_group_size=16)
    ropt = torch.optim.AdamW([p for p in rq.parameters() if p.requires_grad], lr=1e-3)
    train_steps(rq, ropt, None, data[:1])
    torch.save(rq.state_dict(), tmp_path / "roste.pt")
    export(rq, str(tmp_path / "roste_export.safetensors"))
    loaded = load_exported(tiny_llama(3, torch.float32), str(tmp_path / "roste_export.safetensors"))
    torch.save(loaded.state_dict(), tmp_path / "roste_loaded.pt")
    with torch.no_grad():
        torch.save(
            {"trained": rq(data[0]).logits, "exported": loaded(data[0]).logits},
            tmp_path / "roste_logits.pt",
        )

    out = run_fresh(
        tmp_path,
        """
        from safetensors.torch import load_file
        from longtune.quant import load_exported, prepare_roste
        from longtune.train.s2ft import select_and_permute
        data = batches(4)
        s2 = tiny_llama(7)
        # other picks, same block sizes
        select_and_permute(s2, head_ratio=0.5, channel_ratio=0.25, seed=5)
        opt = torch.optim.AdamW([p for p in s2.parameters() if p.requires_grad], lr=1e-2)
        s2.load_state_dict(load_file("s2ft.safetensors"))
        opt.load_state_dict(torch.load("s2ft_opt.pt", weights_only=True))
        with torch.no_grad():
            OUT["s2ft_logits"] = torch.equal(s2(data[0]).logits,
                                             torch.load("s2ft_logits.pt", weights_only=True))
        OUT["s2ft_next"] = train_steps(s2, opt, None, data[2:])
        torch.save(s2.model.layers[1].mlp.up_proj.adapter(), "adapter_fresh.pt")
        plain = LlamaForCausalLM.from_pretrained("s2ft_merged", dtype=torch.float64)
        with torch.no_grad():
            OUT["s2ft_merged"] = torch.equal(plain(data[0]).logits,
                                             torch.load("s2ft_logits.pt", weights_only=True))

        ref = torch.load("roste_logits.pt", weights_only=True)
        cfg = dict(w_bits=4, a_bits=8, kv_bits=8, w_group_size=16)
        rq = prepare_roste(tiny_llama(5, torch.float32), **cfg)
        rq.load_state_dict(torch.load("roste.pt", weights_only=True))
        ex = load_exported(tiny_llama(6, torch.float32), "roste_export.safetensors")
        again = prepare_roste(tiny_llama(8, torch.float32), **cfg)
        again.load_state_dict(torch.load("roste_loaded.pt", weights_only=True))
        with torch.no_grad():
            OUT["roste_trained"] = torch.equal(rq(data[0]).logits, ref["trained"])
            OUT["roste_export"] = torch.equal(ex(data[0]).logits, ref["exported"])
            OUT["roste_loaded_export_state"] = torch.equal(again(data[0]).logits, ref["exported"])
        OUT["flags"] = [again.model.layers[0].self_attn.q_proj.weight_is_quantized,
                        again.model.layers[0].mlp.down_proj.prerotated_weight]
    """,
    )
    assert out["s2ft_logits"] and out["s2ft_merged"]
    assert out["s2ft_next"] == s2_next
    assert torch.equal(torch.load(tmp_path / "adapter_fresh.pt", weights_only=True), adapter)
    assert out["roste_trained"] and out["roste_export"] and out["roste_loaded_export_state"]
    assert out["flags"] == [True, True]


# --------------------------------------------------------------- transformers Trainer save / resume
TRAINER_CODE = """
import shutil
from transformers import Trainer, TrainingArguments, default_data_collator
from longtune.train.s2ft import select_and_permute

class LossTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.step_losses.append((out[0] if return_outputs else out).item())
        return out

def dataset():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, TINY["vocab_size"], (24, 10), generator=g)]

def run(kind, out_dir, resume=None):
    if kind == "sparse":   # SparseAdamW (float32) + the SpIEL schedule through the callback
        model = tiny_llama(0, torch.float32)
        longtune.sparsify(model, density=0.05, seed=0 if resume is None else 3)
        opt = longtune.train.SparseAdamW([p for p in model.parameters() if p.requires_grad],
                                         lr=1e-2)
        sched = longtune.train.SpIELScheduler(model, opt, update_every=4, window=2,
                                              drop_fraction=0.5)
        extra = dict(optimizers=(opt, None), callbacks=[longtune.train.SpIELCallback(sched)])
    # the Trainer's default AdamW, the schedule built by the callback, float64
    elif kind == "sparse_adamw":
        model = tiny_llama(0)
        longtune.sparsify(model, density=0.05, seed=0 if resume is None else 3)
        extra = dict(callbacks=[longtune.train.SpIELCallback(update_every=4, window=2,
                                                             drop_fraction=0.5)])
    else:                  # S2FT with the Trainer's default AdamW, float64
        model = tiny_llama(0)
        select_and_permute(model, head_ratio=0.5, channel_ratio=0.25,
                           seed=0 if resume is None else 3)
        extra = {}
    args = TrainingArguments(output_dir=out_dir, max_steps=6, save_steps=3, logging_steps=1,
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True, save_only_model=False,
                             dataloader_num_workers=0)
    tr = LossTrainer(model=model, args=args, train_dataset=dataset(),
                     data_collator=default_data_collator, **extra)
    tr.step_losses = []
    tr.train(resume_from_checkpoint=resume)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return tr.step_losses, trained, model
"""


def test_trainer_save_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    exec(TRAINER_CODE, globals())  # noqa: S102
    ref = {}
    for kind in ("sparse", "sparse_adamw", "s2ft"):
        losses, trained, model = run(kind, str(tmp_path / kind))  # noqa: F821
        assert len(losses) == 6
        assert os.path.isfile(tmp_path / kind / "checkpoint-3" / "model.safetensors")
        if kind.startswith("sparse"):
            assert os.path.isfile(tmp_path / kind / "checkpoint-3" / "spiel_scheduler.pt")
            start = longtune.sparsify(tiny_llama(0), density=0.05, seed=0)
            layers = [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]
            assert any(
                not torch.equal(a.indices, b.indices)
                for a, b in zip(
                    layers, [m for m in start.modules() if isinstance(m, SparseDeltaLinear)]
                )
            )  # regrown
        ref[kind] = losses
        torch.save(trained, tmp_path / f"{kind}_trained.pt")
    out = run_fresh(
        tmp_path,
        TRAINER_CODE
        + """
for kind in ("sparse", "sparse_adamw", "s2ft"):
    losses, trained, _ = run(kind, kind, resume=os.path.join(kind, "checkpoint-3"))
    ref = torch.load(f"{kind}_trained.pt", weights_only=True)
    OUT[kind] = {"losses": losses, "params": trained.keys() == ref.keys() and
                 all(torch.equal(trained[k], ref[k]) for k in ref)}
""",
    )
    for kind in ("sparse", "sparse_adamw", "s2ft"):
        assert out[kind]["losses"] == ref[kind][3:], kind
        assert out[kind]["params"], kind
    # a resume whose checkpoint lacks the schedule's state is an error, not a silent restart of the
    # schedule
    os.remove(tmp_path / "sparse" / "checkpoint-3" / "spiel_scheduler.pt")
    with pytest.raises(FileNotFoundError, match="resuming at step 3"):
        run("sparse", str(tmp_path / "sparse"), resume=str(tmp_path / "sparse" / "checkpoint-3"))  # noqa: F821
