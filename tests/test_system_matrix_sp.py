"""The system matrix under sequence parallelism: every cell of tests/test_system_matrix.py
(attention x training x loss x trainable x batch, the same tiny float64 Llama, weights and data)
run with each sequence split over 2 gloo processes (``longtune.patch(...)`` then
``longtune.distributed.patch_sequence_parallel(model, mode=sp_mode)``), in each sequence-parallel
attention mode, is either exact against one process trained on the full batch or refused with a
clear error before any compute.

Axes (those of the single-process matrix, plus):
- sp_mode: ``halo``, ``ulysses``, ``ring`` (the exchange ``s2_attention_sp`` runs). S^2-Attn
  trains in halo or Ulysses mode, full causal attention (``attention="causal"``) in Ulysses or
  ring mode (``mode="auto"``, the default, picks one of these: not an axis of its own).

A rank runs the model on ``shard_batch``'s shards (global positions, labels shifted over the whole
sequence): the fused head with ``shift_labels=`` (the patch counts the targets over the group, or
takes ``num_items_in_batch``), the head loss as the sum of this rank's float64 token losses over
the global number of targets (``global_token_count``, or ``num_items_in_batch``). The gradients are
summed over the group (``sum_gradients``), the loss too. The reference is the single-process
matrix's (``_pair`` / ``_train`` with ``reference=True``: the spec attention, float64 logits, full
backprop on the whole batch). Exact: every trained parameter's gradient within 1e-10 relative
(1e-9 with the fused loss), and the loss.

Supported (exact): attention causal / s2 / s2_roll, full backprop, both losses, every trainable,
batches b2 / right_pad / accum / num_items, in the modes that run the attention (s2 and s2_roll:
halo, ulysses; causal: ulysses, ring); s2_roll with right padding excepted.

Refused (clear error, checked with the message pattern; "before any compute": the embedding has
not run and no parameter has a gradient), in this order:
- ``attention="lambda"`` (inference only): ``patch_sequence_parallel`` names 's2' or 'causal';
- ``mode="halo"`` with ``attention="causal"`` (no S^2 groups): ``patch_sequence_parallel``;
- chunk-wise training (SeCO / SpaCO, ``seco_backward``): the chunks of a sharded sequence would
  need the earlier chunks of the other ranks;
- ``mode="ring"`` with S^2-Attn in training (ring mode is full causal attention): the model's
  forward, before the embedding;
- padding before real tokens (``left_pad``), and any padding with ``longlora_roll`` (its last
  shifted group wraps around to the padding): the model's forward, before the embedding.

Every cell is covered (no reduction of the cross product). Around the matrix, in the same run: a
sequence-parallel model refuses ``longtune.patch(attention="lambda")``,
``longtune.apply(AttentionConfig(kind="lambda"))`` and ``longtune.apply(ChunkwiseConfig)``; an
S^2 model in halo mode refuses ``eval()`` (full causal attention) before any compute and runs it in
mode 'auto'; SpIEL's prune / regrow (``SpIELScheduler``, growth 'ag' and 'ma', the sparse head
under the fused loss included) grows the entries one process grows on the full batch.

One spawn of 2 processes runs everything; the failures are collected and reported together.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available in this build"
)

pytest.importorskip("transformers")
pytest.importorskip("peft")

import longtune  # noqa: E402
from longtune import distributed as sp  # noqa: E402
from longtune.integrations import hf  # noqa: E402

from . import test_system_matrix as M  # noqa: E402
from ._gloo import init_gloo  # noqa: E402

WORLD = 2
SP_MODES = ["halo", "ulysses", "ring"]

CELLS = [
    (a, t, lo, tr, b, s)
    for a in M.ATTENTION
    for t in M.TRAINING
    for lo in M.LOSS
    for tr in M.TRAINABLE
    for b in M.BATCH
    for s in SP_MODES
]


def _refusal(attention, training, batch, sp_mode):
    """The error a refused cell raises (message pattern), or None for a supported cell; every
    refusal is a ValueError."""
    if attention == "lambda":
        return "'s2' or 'causal'"
    if attention == "causal" and sp_mode == "halo":
        return "mode='halo'"
    if training != "full":
        return "chunk-wise"
    if attention != "causal" and sp_mode == "ring":
        return "mode='ring'"
    if batch == "left_pad":
        return "padding before real tokens"
    if batch == "right_pad" and attention == "s2_roll":
        return "longlora_roll"
    return None


EXACT = [c for c in CELLS if _refusal(c[0], c[1], c[4], c[5]) is None]


def _sp_train(model, training, loss, variant):
    """One step's backward on this rank's shards; returns (loss summed over the group, {name:
    gradient summed over the group})."""
    model.zero_grad(set_to_none=True)
    parts, num_items = M._micro_batches(variant)
    total = 0.0
    for ids, labels, mask in parts:
        batch = sp.shard_batch(ids, labels, attention_mask=mask)
        if training != "full":  # what a user would pass: this rank's shards
            out = longtune.train.seco_backward(
                model,
                batch.input_ids,
                batch.labels,
                chunk_size=M.CHUNK // WORLD,
                budget=None if training == "seco" else 1,
                cap=None,
                attention_mask=batch.attention_mask,
                generator=torch.Generator().manual_seed(3),
                num_items_in_batch=num_items,
            )
            total += float(out)
            continue
        kw = dict(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        )
        if loss == "fused":  # the patch counts the global targets when num_items is None
            out = model(**kw, shift_labels=batch.labels, num_items_in_batch=num_items).loss
        else:
            logits = model(**kw).logits
            s = F.cross_entropy(
                logits.reshape(-1, M.VOCAB),
                batch.labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            n = num_items if num_items is not None else sp.global_token_count(batch.labels)
            out = s / n
        out.backward()
        total += float(out.detach())
    sp.sum_gradients(model.parameters())
    t = torch.tensor([total], dtype=torch.float64)
    dist.all_reduce(t)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return float(t), grads


def _references(rank, world):
    """{(attention, trainable, batch): (loss, grads)} of the single-process reference for every
    supported cell (it does not depend on the loss axis: the reference's loss always comes from its
    float64 logits), computed by the ranks in turn and shared."""
    keys = sorted({(a, tr, b) for a, _, _, tr, b, _ in EXACT})
    models = sorted({(a, tr) for a, tr, _ in keys})
    mine = {}
    for a, tr in models[rank::world]:
        ref = M._reference_model(a, tr)
        for key in keys:
            if key[:2] == (a, tr):
                mine[key] = M._train(ref, "full", "head", key[2], reference=True)
    shared = [None] * world
    dist.all_gather_object(shared, mine)
    return {k: v for part in shared for k, v in part.items()}


def _embedding_calls(model):
    """A counter of the input embedding's forwards (a refusal must come before any compute)."""
    calls = [0]

    def count(module, args):
        calls[0] += 1

    hf.hf_model(model, "test").get_input_embeddings().register_forward_pre_hook(count)
    return calls


def _run_cell(model, calls, refs, attention, training, loss, trainable, batch, sp_mode):
    """None when the cell holds (exact, or refused as expected), else what went wrong."""
    pattern = _refusal(attention, training, batch, sp_mode)
    model.zero_grad(set_to_none=True)
    calls[0] = 0
    try:
        sp.patch_sequence_parallel(model, mode=sp_mode)
        got_loss, got = _sp_train(model, training, loss, batch)
    except ValueError as e:
        if pattern is None:
            return f"unexpected refusal: {e}"
        if pattern not in str(e):
            return f"refused with {str(e)!r}, expected a message with {pattern!r}"
        if calls[0]:
            return f"refused after compute ({calls[0]} embedding forwards): {e}"
        if any(p.grad is not None for p in model.parameters()):
            return f"refused after a gradient was accumulated: {e}"
        return None
    if pattern is not None:
        return f"not refused (expected a ValueError with {pattern!r})"
    ref_loss, want = refs[(attention, trainable, batch)]
    if set(got) != set(want):
        return f"trained parameters differ: {sorted(set(got) ^ set(want))}"
    tol = 1e-9 if loss == "fused" else 1e-10
    if abs(got_loss - ref_loss) > tol * abs(ref_loss):
        return f"loss {got_loss!r} != {ref_loss!r}"
    errs = {n: M._rel(got[n], want[n]) for n in want}
    worst = max(errs, key=errs.get)
    if errs[worst] > tol:
        return f"gradient of {worst} differs by {errs[worst]:.3g} (relative)"
    return None


def _expect_refusal(fn, *words):
    try:
        fn()
    except ValueError as e:
        missing = [w for w in words if w not in str(e)]
        return None if not missing else f"error {str(e)!r} lacks {missing}"
    return f"no ValueError (expected one naming {words})"


def _focused_checks():
    """The refusals around the matrix: a sequence-parallel model cannot be re-patched with the
    Lambda-mask or given a ChunkwiseConfig; S^2 in halo mode refuses eval() (full causal
    attention) before any compute and runs it in mode 'auto'."""
    out = []
    model = M._test_model("s2", "fused", "full")
    sp.patch_sequence_parallel(model, mode="halo")
    why = _expect_refusal(
        lambda: longtune.patch(model, attention="lambda"), "lambda", "unpatch_sequence_parallel"
    )
    out.append(("patch(attention='lambda') on a sequence-parallel model", why))
    why = _expect_refusal(
        lambda: longtune.apply(model, longtune.config.ChunkwiseConfig(chunk_size=16)),
        "ChunkwiseConfig",
        "sequence",
    )
    out.append(("apply(ChunkwiseConfig) on a sequence-parallel model", why))
    why = _expect_refusal(
        lambda: longtune.apply(model, longtune.config.AttentionConfig(kind="lambda")),
        "lambda",
        "unpatch_sequence_parallel",
    )
    out.append(("apply(AttentionConfig(kind='lambda')) on a sequence-parallel model", why))
    calls = _embedding_calls(model)
    ids = sp.shard_sequence(M._batch("b2")[0], 1)
    model.eval()
    why = _expect_refusal(lambda: model(input_ids=ids), "eval", "mode='halo'")
    out.append(("s2 with mode='halo' in eval()", why or (calls[0] and "after compute") or None))
    sp.patch_sequence_parallel(model, mode="auto")
    with torch.no_grad():
        model(input_ids=ids)  # Ulysses mode
    return [f"{what}: {why}" for what, why in out if why]


def _spiel_indices(sharded, growth):
    """The sparse-delta indices after two SpIEL steps (one window: the first backward picks the
    candidates, the second adds to their scores; then the update), trained on the full batch or
    sequence-parallel (the scheduler sums its statistics over the group)."""
    model = M._test_model("s2", "fused", "sparse")
    if sharded:
        sp.patch_sequence_parallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = longtune.train.SpIELScheduler(
        model, opt, update_every=2, window=2, drop_fraction=0.5, growth=growth
    )
    ids, labels, _, _ = M._batch("b2")
    for _ in range(2):
        opt.zero_grad()
        if sharded:
            batch = sp.shard_batch(ids, labels)
            model(input_ids=batch.input_ids, shift_labels=batch.labels).loss.backward()
            sp.sum_gradients(model.parameters())
        else:
            model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        sched.step()
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("indices")}


def _spiel_checks():
    """SpIEL's prune / regrow under sequence parallelism grows the entries one process grows on
    the full batch (SpIEL-AG and SpIEL-MA)."""
    out = []
    for growth in ("ag", "ma"):
        want, got = _spiel_indices(False, growth), _spiel_indices(True, growth)
        assert want.keys() == got.keys() and want
        bad = [n for n in want if not torch.equal(torch.sort(want[n])[0], torch.sort(got[n])[0])]
        if bad:
            out.append(f"SpIELScheduler(growth={growth!r}): other entries grown in {bad}")
    return out


def _worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    init_gloo(rank, world, init_file, timeout_s=60)
    failures = []
    try:
        refs = _references(rank, world)
        for a in M.ATTENTION:
            for lo in M.LOSS:
                for tr in M.TRAINABLE:
                    model = M._test_model(a, lo, tr)
                    calls = _embedding_calls(model)
                    for s in SP_MODES:
                        for t in M.TRAINING:
                            for b in M.BATCH:
                                cell = (a, t, lo, tr, b, s)
                                try:
                                    why = _run_cell(model, calls, refs, *cell)
                                except Exception:
                                    why = "crashed:\n" + traceback.format_exc()
                                if why is not None:
                                    failures.append(f"{'-'.join(cell)}: {why}")
        failures += _focused_checks() + _spiel_checks()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_file, "w") as f:
            f.write("\n".join(failures))


def test_system_matrix_sequence_parallel(tmp_path):
    assert len(CELLS) == 1800 and len(EXACT) == 220  # the cross product; the supported cells
    out = tmp_path / "failures.txt"
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    failures = [line for line in out.read_text().splitlines() if line]
    assert not failures, f"{len(failures)} failure(s):\n" + "\n".join(failures)
