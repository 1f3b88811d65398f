"""Sequence parallelism for Hugging Face models (longtune.distributed.patch_sequence_parallel) on
two CPU processes (gloo): a patched tiny Llama (and Qwen2, Mistral) trained one step on sequence
shards gives the parameter gradients of one process on the full batch (float64, 1e-10 relative),
with the fused cross-entropy head, with a loss computed from the logits, with transformers' own
loss (float32 inside), with padding at the end; in eval() and with attention="causal" each rank's
logits are its rows of one process's; padding elsewhere and padding with longlora_roll are
refused.

One spawn runs every case; a failing check raises in the worker and fails the spawn."""

import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available in this build"
)

transformers = pytest.importorskip("transformers")

import longtune  # noqa: E402
from longtune import distributed as sp  # noqa: E402

from ._gloo import init_gloo  # noqa: E402

TOL = 1e-10
N, B, VOCAB = 64, 2, 128


FAMILIES = {  # model_type -> (config class, model class) in transformers
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def tiny_llama(family="llama"):
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attention_dropout=0.0,
    )
    return model_cls(cfg).to(torch.float64).train()


def _batch(pad_from=None):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, N), generator=gen)
    labels = ids.clone()
    mask = torch.ones(B, N, dtype=torch.long)
    if pad_from is not None:
        mask[1, pad_from:] = 0
        labels[1, pad_from:] = -100
    return ids, labels, mask


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(got, want, what, tol=TOL):
    assert got.keys() == want.keys(), what
    for name in want:
        err = _rel(got[name], want[name])
        assert err <= tol, f"{what}: gradient of {name} differs by {err:.3g} (relative)"


def _patched(fused, mode="leakfree", family="llama"):
    m = tiny_llama(family)
    longtune.patch(m, attention="s2", mode=mode, lm_head="fused_ce" if fused else None)
    return m


def _reference(fused, loss_kind, mask=None, pad_from=None, mode="leakfree", family="llama"):
    """One process, full batch: the mean of the token losses over all targets."""
    m = _patched(fused, mode, family)
    ids, labels, am = _batch(pad_from)
    am = am if mask else None
    if loss_kind == "logits":
        logits = m(input_ids=ids, attention_mask=am).logits
        tgt = sp.shift_labels(labels)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), reduction="mean")
    else:
        loss = m(input_ids=ids, attention_mask=am, labels=labels).loss
    loss.backward()
    return float(loss.detach()), _grads(m)


def _sharded(
    fused, loss_kind, mask=None, pad_from=None, mode="leakfree", positions=True, family="llama"
):
    m = _patched(fused, mode, family)
    sp.patch_sequence_parallel(m)
    ids, labels, am = _batch(pad_from)
    batch = sp.shard_batch(ids, labels, attention_mask=am if mask else None)
    pos = batch.position_ids if positions else None
    if loss_kind == "logits":
        n = sp.global_token_count(batch.labels)
        logits = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=pos).logits  # fmt: skip
        loss = (
            F.cross_entropy(logits.reshape(-1, VOCAB), batch.labels.reshape(-1), reduction="sum")
            / n
        )
    else:  # the patch counts the global targets (num_items_in_batch)
        loss = m(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=pos,
            shift_labels=batch.labels,
        ).loss
    loss.backward()
    sp.sum_gradients(m.parameters())
    total = torch.tensor([float(loss.detach())], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total), _grads(m)


def _expect_error(fn, exc, *words):
    try:
        fn()
    except exc as e:
        msg = str(e)
        assert all(w in msg for w in words), f"error {msg!r} lacks {words}"
        return
    raise AssertionError(f"no {exc.__name__} raised (expected one naming {words})")


def _check_all(rank):
    # fused CE head, and a float64 loss from the logits: exact
    for fused, kind, positions in ((True, "model", True), (False, "logits", False)):
        want_loss, want = _reference(fused, kind)
        got_loss, got = _sharded(fused, kind, positions=positions)
        what = f"fused={fused}, loss={kind}"
        assert abs(got_loss - want_loss) <= TOL * abs(want_loss), (what, got_loss, want_loss)
        _compare(got, want, what)
    # the other supported families (Qwen2: q/k/v biases; Mistral), fused head, right padding
    for family in ("qwen2", "mistral"):
        want_loss, want = _reference(True, "model", mask=True, pad_from=20, family=family)
        got_loss, got = _sharded(True, "model", mask=True, pad_from=20, family=family)
        assert abs(got_loss - want_loss) <= TOL * abs(want_loss), (family, got_loss, want_loss)
        _compare(got, want, family)
    # transformers' own loss (it upcasts the logits to float32 only)
    want_loss, want = _reference(False, "model")
    got_loss, got = _sharded(False, "model")
    assert abs(got_loss - want_loss) <= 1e-6 * abs(want_loss), (got_loss, want_loss)
    _compare(got, want, "transformers' loss", tol=1e-5)
    # padding at the end of the sequence (crossing the shard boundary): exact
    for fused in (True, False):
        kind = "model" if fused else "logits"
        want_loss, want = _reference(fused, kind, mask=True, pad_from=20)
        got_loss, got = _sharded(fused, kind, mask=True, pad_from=20)
        _compare(got, want, f"right padding, fused={fused}")
    # padding before real tokens, and padding with longlora_roll: refused on every rank
    m = _patched(True)
    sp.patch_sequence_parallel(m)
    ids, labels, am = _batch()
    am[0, 3] = 0
    batch = sp.shard_batch(ids, labels, attention_mask=am)
    _expect_error(
        lambda: m(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            shift_labels=batch.labels,
        ),  # fmt: skip
        ValueError,
        "padding",
        "end",
    )
    m = _patched(True, mode="longlora_roll")
    sp.patch_sequence_parallel(m)
    _, _, am = _batch(pad_from=40)
    batch = sp.shard_batch(ids, labels, attention_mask=am)
    _expect_error(
        lambda: m(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            shift_labels=batch.labels,
        ),  # fmt: skip
        ValueError,
        "longlora_roll",
    )
    # longlora_roll without padding: exact
    want_loss, want = _reference(True, "model", mode="longlora_roll")
    got_loss, got = _sharded(True, "model", mode="longlora_roll")
    _compare(got, want, "longlora_roll")
    # eval(): full causal attention over the sharded sequence (Ulysses mode at H = 4, W = 2), and
    # attention="causal" in training: each rank's logits are its rows of one process's
    for attention, train in (("s2", False), ("causal", True)):
        m = tiny_llama().train(train)
        longtune.patch(m, attention=attention)
        ids, _, _ = _batch()
        with torch.no_grad():
            want = m(input_ids=ids).logits
            sp.patch_sequence_parallel(m)
            got = m(input_ids=sp.shard_sequence(ids, 1)).logits
        err = _rel(got, sp.shard_sequence(want, 1))
        assert err <= TOL, f"{attention}, train={train}: logits differ by {err:.3g}"
    # plain labels (shifted inside the shard) are refused; longtune.patch(sequence_parallel=...)
    _expect_error(lambda: m(input_ids=batch.input_ids, labels=batch.labels), ValueError,
                  "shift_labels")  # fmt: skip
    m = tiny_llama()
    longtune.patch(m, attention="s2", sequence_parallel=True)
    assert m._longtune_sp is not None and all(
        a._longtune_sp is m._longtune_sp for a in m.model.modules() if hasattr(a, "o_proj")
    )
    longtune.unpatch(m)
    assert not hasattr(m, "_longtune_sp")
    _expect_error(lambda: sp.patch_sequence_parallel(tiny_llama()), ValueError, "longtune.patch")
    _expect_error(lambda: sp.patch_sequence_parallel(_patched(True), mode="zz"), ValueError, "mode")


def _worker(rank, world, init_file):
    torch.set_num_threads(1)
    init_gloo(rank, world, init_file)
    try:
        _check_all(rank)
        dist.barrier()
    except Exception:
        raise AssertionError(traceback.format_exc()) from None
    finally:
        dist.destroy_process_group()


def test_hf_sequence_parallel_gradients(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
