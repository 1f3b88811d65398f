"""The system matrix: longtune's features combined the way users combine them, on a tiny Llama in
float64, each cell either exact against a plain reference or refused with a clear error.

Axes:
- attention: ``causal``, ``s2`` (S^2-Attn leak-free), ``s2_roll`` (LongLoRA's roll), ``lambda``
  (LM-Infinite, inference only);
- training: ``full`` backprop, ``seco`` (chunk-wise, exact), ``spaco`` (chunk-wise with a fixed
  sample: the same draw on both sides);
- loss: ``head`` (the model's own logits + cross-entropy, in float64) or ``fused`` (``patch(model,
  lm_head="fused_ce")``);
- trainable: ``full`` (every weight), ``lora`` (``recipes.longlora``), ``sparse`` (``sparsify``, the
  vocabulary head included), ``s2ft`` (``select_and_permute``), ``roste`` (``prepare_roste``: the
  rotations R1-R4, quantizers off since the fake-quant kernels have no float64 path);
- batch: ``b2`` (two equal rows), ``left_pad`` / ``right_pad`` (two rows, one padded),
  ``accum`` (two micro-batches accumulated with ``num_items_in_batch``), ``num_items``
  (``num_items_in_batch`` other than the number of targets, as Trainer passes it).

The reference of every cell is the same trainable model with its attention computed by the
pure-PyTorch spec (``longtune.reference.attention``, registered as a transformers attention
function) and the loss computed from float64 logits, trained by full backprop (SpaCO: by the same
sampled chunk-wise estimator, whose exactness against full backprop is covered by the SeCO cells
and tests/test_chunkwise.py). Exact means every trained parameter's gradient within 1e-10
relative (1e-9 where the fused loss sums in another order), and the loss too.

Refused (clear error, before any compute): the Lambda-mask in training; ``longlora_roll`` under
chunk-wise training.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask  # noqa: E402

import longtune  # noqa: E402
from longtune.integrations import hf  # noqa: E402
from longtune.nn.attention import s2_group_size  # noqa: E402
from longtune.reference import attention as R  # noqa: E402

VOCAB, N, CHUNK, RATIO = 128, 96, 32, 0.25
ATTENTION = ["causal", "s2", "s2_roll", "lambda"]
TRAINING = ["full", "seco", "spaco"]
LOSS = ["head", "fused"]
TRAINABLE = ["full", "lora", "sparse", "s2ft", "roste"]
BATCH = ["b2", "left_pad", "right_pad", "accum", "num_items"]
REF_IMPL = "longtune_matrix_reference"


# ---------------------------------------------------------------- the reference attention
def _reference_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """The S^2 / causal mask of the patched model, computed densely by the spec."""
    kind, mode = module._matrix_reference
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    kpm = None if attention_mask is None else attention_mask[:, -k.shape[1] :].bool()
    mask = {}
    if kind == "s2" and module.training and q.shape[1] > 1:
        total = hf._SEQUENCE_LENGTH.get() or k.shape[1]
        mask = {"s2_group_size": s2_group_size(total, RATIO), "s2_mode": mode}
    return R.sparse_attention(q, k, v, softmax_scale=scaling, key_padding_mask=kpm, **mask), None


AttentionInterface.register(REF_IMPL, _reference_attention)
AttentionMaskInterface.register(REF_IMPL, flash_attention_mask)


# ---------------------------------------------------------------- models
def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).double().train()


@torch.no_grad()
def _perturb(model, names, seed=1):
    """Random values for parameters that start at zero (LoRA B, sparse deltas), so they matter."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if any(s in n for s in names):
            p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@functools.lru_cache(maxsize=None)
def _trainable_base(trainable):
    m = _tiny_llama()
    if trainable == "lora":
        m, _ = longtune.recipes.longlora(m, target_context=256, lora_r=4, patch_attention=False)
        _perturb(m, ("lora_B",))
    elif trainable == "sparse":
        longtune.sparsify(m, density=0.1, seed=0)
        _perturb(m, ("values",))
    elif trainable == "s2ft":
        longtune.train.s2ft.select_and_permute(m, head_ratio=0.5, channel_ratio=0.25, seed=0)
    elif trainable == "roste":
        # the rotations (R1 merged, R2, online R3 around the attention, online R4); the fake-quant
        # kernels have no float64 path, so their quantizers are off in this float64 matrix
        longtune.quant.prepare_roste(m, w_bits=None, a_bits=None, kv_bits=None)
    return m


PATCH = {  # attention axis -> longtune.patch(attention=kind, **options)
    "causal": ("causal", {}),
    "s2": ("s2", {"group_size_ratio": RATIO}),
    "s2_roll": ("s2", {"group_size_ratio": RATIO, "mode": "longlora_roll"}),
    "lambda": ("lambda", {"window": 32, "n_global": 4}),
}


def _test_model(attention, loss, trainable):
    """The model under test: a copy of the trainable model, patched."""
    test = copy.deepcopy(_trainable_base(trainable))
    kind, opts = PATCH[attention]
    longtune.patch(test, attention=kind, **opts)
    if loss == "fused":
        longtune.patch(test, lm_head="fused_ce")
    return test


def _reference_model(attention, trainable):
    """The reference: a copy of the same trainable model, its attention computed by the spec
    (the loss of the reference is always computed from its logits)."""
    ref = copy.deepcopy(_trainable_base(trainable))
    kind, opts = PATCH[attention]
    ref_base = hf.hf_model(ref, "reference")
    hf._set_implementation(ref_base, REF_IMPL)
    for m in hf._attention_modules(ref_base):
        m._matrix_reference = (kind, opts.get("mode", "leakfree"))
    return ref


def _pair(attention, loss, trainable):
    """(model under test, reference model): the same weights; the test model patched."""
    return _test_model(attention, loss, trainable), _reference_model(attention, trainable)


# ---------------------------------------------------------------- data
def _batch(variant):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (2, N), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[1, N // 2] = -100  # a hole
    mask = torch.ones_like(ids)
    if variant == "left_pad":
        mask[1, :20] = 0
    elif variant == "right_pad":
        mask[1, -20:] = 0
    labels[mask == 0] = -100
    n_targets = int((labels[:, 1:] != -100).sum())
    num_items = (
        3 * n_targets if variant == "num_items" else (n_targets if variant == "accum" else None)
    )
    return ids, labels, (mask if variant.endswith("pad") else None), num_items


def _micro_batches(variant):
    ids, labels, mask, num_items = _batch(variant)
    if variant == "accum":
        return [(ids[i : i + 1], labels[i : i + 1], None) for i in range(2)], num_items
    return [(ids, labels, mask)], num_items


# ---------------------------------------------------------------- training
def _head_loss(model, ids, labels, mask, num_items):
    """Causal-LM loss from the model's float64 logits (transformers' formula without its float32
    cast)."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    tgt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1).reshape(-1)
    s = F.cross_entropy(logits.reshape(-1, VOCAB), tgt, ignore_index=-100, reduction="sum")
    return s / (num_items if num_items is not None else int((tgt != -100).sum()))


def _train(model, training, loss, variant, *, reference=False):
    """Runs one step's backward; returns (loss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    parts, num_items = _micro_batches(variant)
    total = 0.0
    for ids, labels, mask in parts:
        if training == "full" or (reference and training == "seco"):
            if loss == "fused" and not reference:
                kw = {} if num_items is None else {"num_items_in_batch": num_items}
                out = model(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss
            else:
                out = _head_loss(model, ids, labels, mask, num_items)
            out.backward()
            total += float(out.detach())
        else:
            budget = None if training == "seco" else 2
            gen = torch.Generator().manual_seed(3)
            total += float(
                longtune.train.seco_backward(
                    model,
                    ids,
                    labels,
                    chunk_size=CHUNK,
                    budget=budget,
                    cap=None,
                    attention_mask=mask,
                    generator=gen,
                    num_items_in_batch=num_items,
                )
            )
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return total, grads


def _rel(got, ref):
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


def _refusal(attention, training, variant):
    """The error a refused cell raises (type, message pattern), or None for a supported cell."""
    if attention == "lambda":
        return (RuntimeError, ValueError), "inference"
    if training != "full" and attention == "s2_roll":
        return ValueError, "longlora_roll"
    return None


CELLS = [
    (a, t, lo, tr, b)
    for a in ATTENTION
    for t in TRAINING
    for lo in LOSS
    for tr in TRAINABLE
    for b in BATCH
]


@pytest.mark.parametrize(
    "attention,training,loss,trainable,batch", CELLS, ids=["-".join(c) for c in CELLS]
)
def test_cell(attention, training, loss, trainable, batch):
    test, ref = _pair(attention, loss, trainable)
    refused = _refusal(attention, training, batch)
    if refused is not None:
        exc, pattern = refused
        with pytest.raises(exc, match=pattern):
            _train(test, training, loss, batch)
        return
    got_loss, got = _train(test, training, loss, batch)
    ref_loss, want = _train(ref, training, loss, batch, reference=True)
    assert set(got) == set(want)
    tol = 1e-9 if loss == "fused" else 1e-10
    assert abs(got_loss - ref_loss) <= tol * abs(ref_loss)
    errs = {n: _rel(got[n], want[n]) for n in want}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, (worst, errs[worst])
