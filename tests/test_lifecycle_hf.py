"""Lifecycle of a patched Hugging Face model: what is configured and trained is saved in this
process and loaded in a fresh one (``subprocess``), bit for bit -- the attention / fused-loss patch
through ``save_pretrained`` -> ``from_pretrained`` + ``longtune.patch(model)``, a LongLoRA fine-tune
through its peft adapter or merged, and ``transformers.Trainer`` resumed from a checkpoint in a new
process continuing the uninterrupted loss curve."""

from __future__ import annotations

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

VOCAB, N = 128, 64

COMMON = textwrap.dedent('''
    import json, sys, torch
    import longtune
    from transformers import LlamaConfig, LlamaForCausalLM
    VOCAB, N = 128, 64

    def batch():
        g = torch.Generator().manual_seed(11)
        ids = torch.randint(0, VOCAB, (2, N), generator=g)
        return ids, ids.clone()

    def probe(model, out):
        """Eval logits, train loss and the trained parameters' gradients, saved to `out`."""
        ids, labels = batch()
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        model.train()
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"logits": logits, "loss": loss.detach(), "grads": grads}, out)
''')


def _tiny(seed=0):
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
    return LlamaForCausalLM(cfg).double()


def _run(tmp_path, body: str, *args: str) -> None:
    script = tmp_path / "worker.py"
    script.write_text(COMMON + textwrap.dedent(body))
    # the same thread count as this process: CPU kernels split their reductions by thread
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    res = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0, res.stderr[-4000:]


def _probe_here(model, out):
    ns: dict = {}
    exec(COMMON, ns)  # the same probe as the fresh process runs
    ns["probe"](model, out)
    return torch.load(out)


def _assert_identical(a, b):
    assert torch.equal(a["logits"], b["logits"])
    assert torch.equal(a["loss"], b["loss"])
    assert a["grads"].keys() == b["grads"].keys() and a["grads"]
    for n in a["grads"]:
        assert torch.equal(a["grads"][n], b["grads"][n]), n


def _one_step(model, lr=1e-2):
    ids = torch.randint(0, VOCAB, (2, N), generator=torch.Generator().manual_seed(5))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_patch_round_trips_through_save_pretrained_in_a_fresh_process(tmp_path):
    m = _tiny()
    longtune.patch(m, attention="s2", group_size_ratio=0.5, mode="leakfree")
    longtune.patch(m, lm_head="fused_ce")
    _one_step(m)
    m.save_pretrained(tmp_path / "model")
    here = _probe_here(m, tmp_path / "here.pt")
    _run(
        tmp_path,
        """
        m = LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float64)
        longtune.patch(m)  # re-applies the stored patch: S^2 (ratio 0.5) and the fused-CE head
        assert m.config.longtune_patch["group_size_ratio"] == 0.5
        assert m.config.longtune_patch["lm_head"] == "fused_ce"
        probe(m, sys.argv[2])
    """,
        str(tmp_path / "model"),
        str(tmp_path / "there.pt"),
    )
    _assert_identical(here, torch.load(tmp_path / "there.pt"))


def test_longlora_adapter_and_merged_model_round_trip_in_a_fresh_process(tmp_path):
    """A LongLoRA fine-tune reloads in a fresh process from (the original base, the peft adapter)
    by re-running the recipe on the base and loading the adapter's weights, or from the merged
    model (rope interpolation and the attention patch travel in its config)."""
    base = _tiny()
    base.save_pretrained(tmp_path / "base")
    pm, _ = longtune.recipes.longlora(base, target_context=256, lora_r=4, group_size_ratio=0.25)
    _one_step(pm)
    pm.save_pretrained(tmp_path / "adapter")
    here = _probe_here(pm, tmp_path / "here.pt")
    merged = pm.merge_and_unload()
    merged.requires_grad_(True)  # as from_pretrained gives it: every weight trainable
    merged.save_pretrained(tmp_path / "merged")
    here_merged = _probe_here(merged, tmp_path / "here_merged.pt")
    _run(
        tmp_path,
        """
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        base = LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float64)
        pm, _ = longtune.recipes.longlora(base, target_context=256, lora_r=4, group_size_ratio=0.25)
        res = set_peft_model_state_dict(pm, load_file(sys.argv[2] + "/adapter_model.safetensors"))
        assert not res.unexpected_keys, res.unexpected_keys
        probe(pm, sys.argv[3])
        merged = LlamaForCausalLM.from_pretrained(sys.argv[4], dtype=torch.float64)
        assert merged.config.max_position_embeddings == 256
        longtune.patch(merged)
        probe(merged, sys.argv[5])
    """,
        str(tmp_path / "base"),
        str(tmp_path / "adapter"),
        str(tmp_path / "there.pt"),
        str(tmp_path / "merged"),
        str(tmp_path / "there_merged.pt"),
    )
    _assert_identical(here, torch.load(tmp_path / "there.pt"))
    # the merged model computes the adapter model's function; its trainable set is every weight
    there_merged = torch.load(tmp_path / "there_merged.pt")
    _assert_identical(here_merged, there_merged)
    torch.testing.assert_close(there_merged["logits"], here["logits"], rtol=1e-12, atol=1e-12)


TRAINER_BODY = """
    import transformers
    from transformers import Trainer, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(3)
            self.ids = torch.randint(0, VOCAB, (12, N), generator=g)
        def __len__(self):
            return len(self.ids)
        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    def make_model():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          attention_dropout=0.0, tie_word_embeddings=False)
        m = LlamaForCausalLM(cfg).double()
        pm, _ = longtune.recipes.longlora(m, target_context=256, lora_r=4, group_size_ratio=0.25)
        longtune.patch(pm, lm_head="fused_ce")
        return pm

    def train(out_dir, max_steps, resume):
        args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2,
                                 max_steps=max_steps, save_steps=3, learning_rate=1e-2,
                                 logging_steps=1,
                                 report_to=[], use_cpu=True, seed=0, data_seed=0,
                                 dataloader_num_workers=0, lr_scheduler_type="linear",
                                 warmup_steps=1)
        t = Trainer(model=make_model(), args=args, train_dataset=Rows())
        t.train(resume_from_checkpoint=resume)
        torch.save({n: p.detach() for n, p in t.model.named_parameters() if p.requires_grad},
                   out_dir + "/final.pt")
        return [h["loss"] for h in t.state.log_history if "loss" in h]

    mode, out_dir = sys.argv[1], sys.argv[2]
    if mode == "full":
        losses = train(out_dir, 6, None)
    elif mode == "first_half":
        # stop right after the checkpoint at step 3, with the 6-step schedule
        from transformers import TrainerCallback
        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 3:
                    control.should_training_stop = True
        args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2,
                                 max_steps=6, save_steps=3, learning_rate=1e-2, logging_steps=1,
                                 report_to=[],
                                 use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                                 lr_scheduler_type="linear", warmup_steps=1)
        t = Trainer(model=make_model(), args=args, train_dataset=Rows(), callbacks=[Stop()])
        t.train()
        losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    else:
        losses = train(out_dir, 6, out_dir + "/checkpoint-3")
    json.dump(losses, open(out_dir + "/losses.json", "w"))
"""


def test_trainer_resume_in_a_fresh_process_continues_the_loss_curve(tmp_path):
    """LongLoRA (peft) + S^2-Attn + fused-CE head under transformers.Trainer (gradient accumulation,
    linear schedule): interrupted after the checkpoint at step 3 and resumed from it in a new
    process, the losses of steps 4-6 are the uninterrupted run's."""
    full, part = tmp_path / "full", tmp_path / "part"
    _run(tmp_path, TRAINER_BODY, "full", str(full))
    _run(tmp_path, TRAINER_BODY, "first_half", str(part))
    first = json.loads((part / "losses.json").read_text())
    _run(tmp_path, TRAINER_BODY, "resume", str(part))
    want = json.loads((full / "losses.json").read_text())
    assert len(want) == 6 and len(first) == 3
    assert want[:3] == first[:3]
    assert (part / "checkpoint-3").is_dir()
    resumed = json.loads((part / "losses.json").read_text())  # rewritten by the resumed run
    assert resumed[-3:] == want[3:]
    # the logged losses are rounded; the trained weights after step 6 are compared bit for bit
    a, b = torch.load(full / "final.pt"), torch.load(part / "final.pt")
    assert a.keys() == b.keys() and any("lora_A" in n for n in a)
    for n in a:
        assert torch.equal(a[n], b[n]), n
