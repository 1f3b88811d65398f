"""longtune inside transformers' ``Trainer`` and TRL's ``SFTTrainer``.

``LongtuneTrainer`` (a ``transformers.Trainer``) and ``LongtuneSFTTrainer`` (a ``trl.SFTTrainer``;
built on first access, so trl is needed only by its users) train a model set up with
:func:`longtune.apply`. Both are ``LongtuneTrainerMixin`` over the library's trainer:

- with a :class:`~longtune.config.ChunkwiseConfig` applied, every ``training_step`` runs SeCO /
  SpaCO chunk-wise training (:func:`longtune.train.seco_backward`) instead of one forward and
  backward over the whole sequence: same gradient (SeCO), same loss normalisation as the
  ordinary step (``num_items_in_batch`` over the accumulated micro-batches when the Trainer
  counts it, else each micro-batch's mean divided by the accumulation steps), the model's
  autocast (``bf16=True``) applies to every chunk's forward, and SpaCO's draw is seeded by the
  config's ``seed``, the global step and the micro-batch, so a run resumed from a checkpoint
  draws what the uninterrupted run draws; activation checkpointing is turned off (a chunk-wise
  step keeps one chunk's activations; trl turns checkpointing on by default);
- with a :class:`~longtune.config.SparseDeltaConfig` whose ``update_every`` is set, a
  ``SpIELCallback`` runs the prune / regrow schedule (added unless one is passed).

Without those configs they are the library's trainers.

``SpIELCallback``: SpIEL prune / regrow inside a transformers ``Trainer``, resumable.

``Trainer`` checkpoints the model, its optimizer and its learning-rate scheduler; the SpIEL schedule
is a fourth piece of state (step counter, growth statistics of an open window, SM3 accumulators).
The callback steps ``SpIELScheduler`` after every optimizer step, writes its ``state_dict()`` as
``spiel_scheduler.pt`` into every checkpoint folder, and restores it when training resumes from a
checkpoint, so a resumed run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import os
import warnings

import torch
from transformers import Trainer, TrainerCallback

from ..config import ChunkwiseConfig, SparseDeltaConfig, get_config
from ..train.sparse_delta import SpIELScheduler
from ._common import hf_model
from .apply import chunkwise_backward

__all__ = [
    "LongtuneTrainerMixin",
    "LongtuneTrainer",
    "SpIELCallback",
]  # and LongtuneSFTTrainer (built on access)

SCHEDULER_STATE_NAME = "spiel_scheduler.pt"


def _unwrap_optimizer(opt):
    # accelerate's AcceleratedOptimizer (and similar wrappers) keep the real optimizer in
    # `.optimizer`
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


class SpIELCallback(TrainerCallback):
    """``SpIELCallback(scheduler)`` with a ``SpIELScheduler`` built over the model and the optimizer
    given to the Trainer (``optimizers=(opt, None)``), or ``SpIELCallback(**scheduler_options)``
    (``update_every=...``, ``window=...``, ...): the scheduler is then built at the start of
    training over the Trainer's own optimizer (e.g. its default AdamW), available as
    ``callback.scheduler``.

    When training resumes (``trainer.train(resume_from_checkpoint=...)``) the state is read from
    ``resume_from`` if given, else from ``<output_dir>/checkpoint-<global step>`` (the folder the
    Trainer wrote at that step); a missing file is an error, not a silent restart of the
    schedule."""

    def __init__(
        self,
        scheduler: SpIELScheduler | None = None,
        *,
        resume_from: str | os.PathLike | None = None,
        **scheduler_options,
    ):
        if scheduler is not None and scheduler_options:
            raise TypeError(
                "SpIELCallback: pass either a SpIELScheduler or the options to build one, not both"
            )
        if scheduler is not None and not isinstance(scheduler, SpIELScheduler):
            raise TypeError(
                f"SpIELCallback: expected a SpIELScheduler, got {type(scheduler).__name__}"
            )
        self.scheduler = scheduler
        self.scheduler_options = scheduler_options
        self.resume_from = resume_from

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = _unwrap_optimizer(optimizer)
        if self.scheduler is None:
            self.scheduler = SpIELScheduler(model, opt, **self.scheduler_options)
        elif self.scheduler.optimizer is None:
            self.scheduler.optimizer = opt
        elif opt is not None and self.scheduler.optimizer is not opt:
            raise ValueError(
                "SpIELCallback: the SpIELScheduler was built over another optimizer than the "
                "Trainer's; pass the same optimizer to the Trainer (optimizers=(opt, None)) or "
                "build the scheduler without one"
            )
        if state.global_step > 0:  # resumed from a checkpoint
            folder = self.resume_from or os.path.join(
                args.output_dir, f"checkpoint-{state.global_step}"
            )
            path = os.path.join(folder, SCHEDULER_STATE_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"SpIELCallback: resuming at step {state.global_step}, but {path} does not "
                    "exist; pass SpIELCallback(..., resume_from=<checkpoint folder>)"
                )
            self.scheduler.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def on_step_end(self, args, state, control, **kwargs):
        self.scheduler.step()

    def on_save(self, args, state, control, **kwargs):
        if self.scheduler is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self.scheduler.state_dict(), os.path.join(folder, SCHEDULER_STATE_NAME))


# ------------------------------------------------------------------ the trainers
# keys a chunk-wise step consumes or may ignore; anything else in a batch is refused, since the
# chunked forward would drop it silently
_CHUNKWISE_KEYS = {"input_ids", "labels", "attention_mask", "position_ids"}
_IGNORED_KEYS = {"completion_mask", "assistant_masks", "use_cache"}


def _chunkwise_inputs(inputs: dict):
    ids, labels = inputs.get("input_ids"), inputs.get("labels")
    if ids is None or labels is None:
        raise ValueError(
            "LongtuneTrainer: chunk-wise training (ChunkwiseConfig) needs batches with input_ids "
            f"and labels; got keys {sorted(inputs)}"
        )
    extra = sorted(set(inputs) - _CHUNKWISE_KEYS - _IGNORED_KEYS)
    if extra:
        raise ValueError(
            "LongtuneTrainer: chunk-wise training takes input_ids, labels and attention_mask; the "
            f"batch also has {extra}, which it cannot pass to the chunks"
        )
    pos = inputs.get("position_ids")
    if pos is not None:
        want = torch.arange(ids.shape[-1], device=pos.device)
        if not bool((pos == want).all()):
            raise ValueError(
                "LongtuneTrainer: chunk-wise training needs position_ids 0..N-1 in every row "
                "(packed sequences, e.g. padding-free collators, are not supported); got other "
                "position_ids"
            )
    return ids, labels, inputs.get("attention_mask")


class LongtuneTrainerMixin:
    """Put before a ``transformers.Trainer`` subclass (``class T(LongtuneTrainerMixin,
    SomeTrainer)``): chunk-wise training steps under a :class:`~longtune.config.ChunkwiseConfig`,
    the SpIEL schedule under a :class:`~longtune.config.SparseDeltaConfig` with ``update_every``.
    See the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._longtune_step = (None, 0)  # (global step, micro-batches run in it)
        sparse = get_config(self.model, SparseDeltaConfig)
        if (
            sparse is not None
            and sparse.update_every is not None
            and not any(isinstance(cb, SpIELCallback) for cb in self.callback_handler.callbacks)
        ):
            self.add_callback(SpIELCallback(**sparse.scheduler_options()))

    @property
    def chunkwise_config(self):
        """The model's applied ChunkwiseConfig, or None (ordinary training steps)."""
        return get_config(self.model, ChunkwiseConfig)

    def _spaco_generator(self, cfg: ChunkwiseConfig):
        step, micro = self._longtune_step
        if step != self.state.global_step:
            step, micro = self.state.global_step, 0
        self._longtune_step = (step, micro + 1)
        if cfg.method != "spaco":
            return None
        return torch.Generator().manual_seed(
            (int(cfg.seed) * 1_000_003 + int(step)) * 1_009 + micro
        )

    def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        cfg = self.chunkwise_config
        if cfg is None:
            return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                "LongtuneTrainer: chunk-wise training does not support torch.nn.DataParallel "
                "(n_gpu > 1); launch one process per device (torchrun / accelerate launch)"
            )
        if getattr(self.accelerator, "scaler", None) is not None:
            raise ValueError(
                "LongtuneTrainer: chunk-wise training does not support fp16 loss scaling; use "
                "bf16=True or full precision"
            )
        base = hf_model(self.model, "LongtuneTrainer")
        if any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules()):
            # transformers drops the cache under activation checkpointing, and a chunk-wise step
            # keeps one chunk's activations anyway (trl's SFTConfig turns checkpointing on by
            # default)
            warnings.warn(
                "LongtuneTrainer: activation checkpointing is turned off for chunk-wise training "
                "(ChunkwiseConfig); set gradient_checkpointing=False to silence this",
                stacklevel=2,
            )
            disable = (
                getattr(base, "activation_checkpointing_disable", None)
                or base.gradient_checkpointing_disable
            )
            disable()
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        ids, labels, mask = _chunkwise_inputs(inputs)
        denom = num_items_in_batch
        if denom is None:
            # each micro-batch's mean loss, divided by the accumulation steps (as Trainer does)
            denom = int((labels[..., 1:] != -100).sum()) * self.current_gradient_accumulation_steps
        elif self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            # Trainer counts the target tokens over all processes and scales each process's loss
            # by their number, because data parallelism averages the gradients
            denom = denom / self.accelerator.num_processes
        generator = self._spaco_generator(cfg)
        with self.compute_loss_context_manager():
            loss = chunkwise_backward(
                model,
                ids,
                labels,
                attention_mask=mask,
                num_items_in_batch=denom,
                generator=generator,
                config=cfg,
            )
        return loss.detach()


class LongtuneTrainer(LongtuneTrainerMixin, Trainer):
    """``transformers.Trainer`` for models set up with :func:`longtune.apply` (see the module
    docstring)."""


_SFT = None


def __getattr__(name):  # trl is imported only when its trainer is asked for
    global _SFT
    if name == "LongtuneSFTTrainer":
        if _SFT is None:
            try:
                from trl import SFTTrainer
            except ImportError as e:
                raise ImportError(
                    "longtune.integrations.trainer.LongtuneSFTTrainer needs trl (pip install trl)"
                ) from e

            class LongtuneSFTTrainer(LongtuneTrainerMixin, SFTTrainer):
                """``trl.SFTTrainer`` for models set up with :func:`longtune.apply` (see the module
                docstring)."""

            LongtuneSFTTrainer.__module__ = __name__
            _SFT = LongtuneSFTTrainer
        return _SFT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
