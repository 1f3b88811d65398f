"""``SpIELCallback``: SpIEL prune / regrow inside a transformers ``Trainer``, resumable.

``Trainer`` checkpoints the model, its optimizer and its learning-rate scheduler; the SpIEL schedule
is a fourth piece of state (step counter, growth statistics of an open window, SM3 accumulators).
The callback steps ``SpIELScheduler`` after every optimizer step, writes its ``state_dict()`` as
``spiel_scheduler.pt`` into every checkpoint folder, and restores it when training resumes from a
checkpoint, so a resumed run continues exactly like an uninterrupted one.
"""
from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

from ..train.sparse_delta import SpIELScheduler

SCHEDULER_STATE_NAME = "spiel_scheduler.pt"


def _unwrap_optimizer(opt):
    # accelerate's AcceleratedOptimizer (and similar wrappers) keep the real optimizer in `.optimizer`
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


class SpIELCallback(TrainerCallback):
    """``SpIELCallback(scheduler)`` with a ``SpIELScheduler`` built over the model and the optimizer
    given to the Trainer (``optimizers=(opt, None)``), or ``SpIELCallback(**scheduler_options)``
    (``update_every=...``, ``window=...``, ...): the scheduler is then built at the start of training
    over the Trainer's own optimizer (e.g. its default AdamW), available as ``callback.scheduler``.

    When training resumes (``trainer.train(resume_from_checkpoint=...)``) the state is read from
    ``resume_from`` if given, else from ``<output_dir>/checkpoint-<global step>`` (the folder the
    Trainer wrote at that step); a missing file is an error, not a silent restart of the schedule."""

    def __init__(self, scheduler: SpIELScheduler | None = None, *, resume_from: str | os.PathLike | None = None,
                 **scheduler_options):
        if scheduler is not None and scheduler_options:
            raise TypeError("SpIELCallback: pass either a SpIELScheduler or the options to build one, not both")
        if scheduler is not None and not isinstance(scheduler, SpIELScheduler):
            raise TypeError(f"SpIELCallback: expected a SpIELScheduler, got {type(scheduler).__name__}")
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
            raise ValueError("SpIELCallback: the SpIELScheduler was built over another optimizer than the Trainer's; "
                             "pass the same optimizer to the Trainer (optimizers=(opt, None)) or build the "
                             "scheduler without one")
        if state.global_step > 0:  # resumed from a checkpoint
            folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            path = os.path.join(folder, SCHEDULER_STATE_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"SpIELCallback: resuming at step {state.global_step}, but {path} does not "
                                        "exist; pass SpIELCallback(..., resume_from=<checkpoint folder>)")
            self.scheduler.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def on_step_end(self, args, state, control, **kwargs):
        self.scheduler.step()

    def on_save(self, args, state, control, **kwargs):
        if self.scheduler is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self.scheduler.state_dict(), os.path.join(folder, SCHEDULER_STATE_NAME))
