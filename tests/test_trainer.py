"""``LongtuneTrainer`` / ``LongtuneSFTTrainer``: chunk-wise training inside transformers' Trainer
and
TRL's SFTTrainer on a tiny float64 Llama on the CPU.

- SeCO under the Trainer with gradient accumulation 2 equals the hand-written loop
  (``seco_backward`` over the same micro-batches, normalised by the global number of target
  tokens, then the optimizer step): the same losses and gradients at every step, and the same
  weights as the ordinary (full backprop) Trainer.
- SpaCO + SpIEL schedule + fused loss: stopped after a checkpoint and resumed from it, the run
  ends with the uninterrupted run's weights, bit for bit.
- bf16 autocast on the CPU; TRL's SFTTrainer a few steps, equal to its ordinary run."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import longtune  # noqa: E402
from longtune.config import (  # noqa: E402
    AttentionConfig,
    ChunkwiseConfig,
    FusedCrossEntropyConfig,
    SparseDeltaConfig,
)
from longtune.integrations.trainer import LongtuneTrainer, SpIELCallback  # noqa: E402

VOCAB, N, CHUNK = 128, 48, 16


def _tiny(dtype=torch.float64, seed=0):
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
    return LlamaForCausalLM(cfg).to(dtype)


class Rows(torch.utils.data.Dataset):
    """Rows of random tokens; a prompt of varying length is masked out of the labels, so the
    micro-batches of a step hold different numbers of target tokens."""

    def __init__(self, n=16):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, VOCAB, (n, N), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[: 3 + 5 * (i % 4)] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def _args(out, **kw):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        save_strategy="no",
        logging_steps=1,
    )
    base.update(kw)
    return TrainingArguments(**base)


class Recorder(TrainerCallback):
    """Each step's gradients (before the optimizer step)."""

    def __init__(self, model):
        self.model, self.grads = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append(
            {
                n: p.grad.detach().clone()
                for n, p in self.model.named_parameters()
                if p.grad is not None
            }
        )


def _recording(cls):
    class Recording(cls):
        """Records every micro-batch, the num_items_in_batch it came with and the step's loss."""

        def training_step(self, model, inputs, num_items_in_batch=None, *a, **k):
            self.seen = getattr(self, "seen", [])
            loss = super().training_step(model, inputs, num_items_in_batch, *a, **k)
            self.seen.append(
                (
                    {k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)},
                    num_items_in_batch,
                    float(loss),
                )
            )
            return loss

    return Recording


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _close(a, b, rtol):
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(
            a[n], b[n], rtol=rtol, atol=rtol * 1e-3, msg=lambda m: f"{n}: {m}"
        )


def test_seco_trainer_equals_the_hand_written_loop_with_gradient_accumulation(tmp_path):
    # the fused loss sums in float64 (transformers' own loss casts the logits to float32)
    model = longtune.apply(
        _tiny(),
        AttentionConfig(kind="s2"),
        FusedCrossEntropyConfig(),
        ChunkwiseConfig(chunk_size=CHUNK),
    )
    hand = copy.deepcopy(model)
    plain = longtune.apply(_tiny(), AttentionConfig(kind="s2"), FusedCrossEntropyConfig())
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    rec = Recorder(model)
    t = _recording(LongtuneTrainer)(
        model=model,
        args=_args(tmp_path / "a"),
        train_dataset=Rows(),
        optimizers=(opt, None),
        callbacks=[rec],
    )
    t.train()
    assert len(t.seen) == 6 and len(rec.grads) == 3

    # the hand-written loop over the same micro-batches
    hopt = torch.optim.SGD(hand.parameters(), lr=1e-2)
    for step in range(3):
        micro = t.seen[2 * step : 2 * step + 2]
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b, _, _ in micro)
        for _batch, given, _ in micro:
            assert int(given) == n_items  # the Trainer's count: the global number of target tokens
        hopt.zero_grad(set_to_none=True)
        losses = [
            float(
                longtune.train.seco_backward(
                    hand, b["input_ids"], b["labels"], chunk_size=CHUNK, num_items_in_batch=n_items
                )
            )
            for b, _, _ in micro
        ]
        assert losses == pytest.approx([s[2] for s in micro], rel=1e-12)
        _close({n: p.grad for n, p in hand.named_parameters()}, rec.grads[step], 1e-12)
        hopt.step()
    _close(_params(hand), _params(model), 1e-12)

    # the ordinary Trainer (full backprop over the whole sequence): the same training
    popt = torch.optim.SGD(plain.parameters(), lr=1e-2)
    Trainer(
        model=plain, args=_args(tmp_path / "b"), train_dataset=Rows(), optimizers=(popt, None)
    ).train()
    _close(_params(plain), _params(model), 1e-9)


def _sparse_spaco_model():
    m = _tiny(seed=1)
    return longtune.apply(
        m,
        AttentionConfig(kind="s2"),
        FusedCrossEntropyConfig(),
        SparseDeltaConfig(density=0.2, seed=0, update_every=2, window=1, drop_fraction=0.5),
        ChunkwiseConfig(method="spaco", chunk_size=CHUNK, budget=2, cap=None),
    )


def test_spaco_with_spiel_resumes_from_a_checkpoint_like_an_uninterrupted_run(tmp_path):
    full = LongtuneTrainer(
        model=_sparse_spaco_model(),
        args=_args(tmp_path / "full", max_steps=4),
        train_dataset=Rows(),
    )
    assert any(isinstance(cb, SpIELCallback) for cb in full.callback_handler.callbacks)
    full.train()

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True

    out = tmp_path / "part"
    first = LongtuneTrainer(
        model=_sparse_spaco_model(),
        args=_args(out, max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=Rows(),
        callbacks=[Stop()],
    )
    first.train()
    assert (out / "checkpoint-2" / "spiel_scheduler.pt").is_file()
    stored = longtune.config.applied(LlamaForCausalLM.from_pretrained(out / "checkpoint-2"))
    assert [type(c).__name__ for c in stored] == [
        "SparseDeltaConfig",
        "AttentionConfig",
        "FusedCrossEntropyConfig",
        "ChunkwiseConfig",
    ]
    resumed = LongtuneTrainer(
        model=_sparse_spaco_model(),
        args=_args(out, max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=Rows(),
    )
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    a, b = _params(full.model), _params(resumed.model)
    assert a.keys() == b.keys() and any(n.endswith("values") for n in a)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    for (n, x), y in zip(full.model.named_buffers(), resumed.model.buffers()):
        assert torch.equal(x, y), n  # the SpIEL indices after prune / regrow


def test_seco_trainer_under_bf16_autocast_on_cpu(tmp_path):
    def run(cls, chunked):
        m = _tiny(torch.float32)
        # transformers' sdpa: longtune's CPU attention takes q, k, v of one dtype, and under CPU
        # autocast the rotary embedding leaves q, k in float32 and v in bfloat16
        if chunked:
            longtune.apply(m, ChunkwiseConfig(chunk_size=CHUNK))
        opt = torch.optim.SGD(
            m.parameters(), lr=1e-1
        )  # (Adam's sign-like first steps would amplify rounding)
        t = _recording(cls)(
            model=m,
            args=_args(tmp_path / str(chunked), bf16=True, max_steps=2),
            train_dataset=Rows(),
            optimizers=(opt, None),
        )
        t.train()
        return [s[2] for s in t.seen], _params(m)

    got_l, got_p = run(LongtuneTrainer, True)
    want_l, want_p = run(Trainer, False)
    assert all(torch.isfinite(torch.tensor(got_l)))
    assert got_l == pytest.approx(want_l, rel=3e-2)
    for n in want_p:
        torch.testing.assert_close(
            got_p[n], want_p[n], rtol=0, atol=1e-3, msg=lambda m: f"{n}: {m}"
        )


def test_chunkwise_step_refuses_batches_it_cannot_chunk(tmp_path):
    m = longtune.apply(_tiny(), ChunkwiseConfig(chunk_size=CHUNK))
    t = LongtuneTrainer(model=m, args=_args(tmp_path), train_dataset=Rows())
    ids = torch.randint(0, VOCAB, (1, N))
    with pytest.raises(ValueError, match="position_ids"):
        t.training_step(m, {"input_ids": ids, "labels": ids, "position_ids": torch.zeros_like(ids)})
    with pytest.raises(ValueError, match="token_type_ids"):
        t.training_step(
            m, {"input_ids": ids, "labels": ids, "token_type_ids": torch.zeros_like(ids)}
        )
    with pytest.raises(ValueError, match="labels"):
        t.training_step(m, {"input_ids": ids})


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="t1", eos_token="t2", unk_token="t0"
    )


def test_trl_sft_trainer_with_seco_equals_its_ordinary_run(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from longtune.integrations.trainer import LongtuneSFTTrainer

    g = torch.Generator().manual_seed(5)
    rows = [
        torch.randint(3, VOCAB, (int(n),), generator=g).tolist()
        for n in (40, 48, 33, 48, 45, 48, 29, 48)
    ]
    data = Dataset.from_dict({"input_ids": rows})

    def run(cls, chunked):
        m = _tiny()
        longtune.apply(
            m, AttentionConfig(kind="s2"), *([ChunkwiseConfig(chunk_size=CHUNK)] if chunked else [])
        )
        args = SFTConfig(
            output_dir=str(tmp_path / str(chunked)),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=2,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            seed=0,
            data_seed=0,
            dataloader_num_workers=0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            save_strategy="no",
            logging_steps=1,
            max_length=N,
            bf16=False,
        )
        opt = torch.optim.SGD(m.parameters(), lr=1e-2)
        t = cls(
            model=m,
            args=args,
            train_dataset=data,
            processing_class=_tokenizer(),
            optimizers=(opt, None),
        )
        t.train()
        return _params(m), [h["loss"] for h in t.state.log_history if "loss" in h]

    with pytest.warns(UserWarning, match="activation checkpointing is turned off"):  # trl's default
        got, got_loss = run(LongtuneSFTTrainer, True)
    want, want_loss = run(SFTTrainer, False)
    assert len(got_loss) == 2 and got_loss == pytest.approx(want_loss, rel=1e-6)
    # trl's loss runs the vocabulary head on float32 hidden states: equal to float32 rounding
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-9, msg=lambda m: f"{n}: {m}")
