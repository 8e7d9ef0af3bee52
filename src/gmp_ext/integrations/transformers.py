"""Hugging Face Trainer callback: ``Trainer(..., callbacks=[GMPCallback(schedule)])``."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:
    raise ImportError(
        "gmp_ext.integrations.transformers needs Transformers: pip install transformers"
    ) from exc

from ..controller import GMP
from ..schedule import GMPSchedule
from . import start_gmp

__all__ = ["CHECKPOINT_FILE", "GMPCallback", "optimizer_steps_per_epoch"]

CHECKPOINT_FILE = "gmp_ext.pt"


def optimizer_steps_per_epoch(args: TrainingArguments, train_dataloader: Any) -> int:
    """``ceil(len(train_dataloader) / gradient_accumulation_steps)``, at least 1: the optimizer
    steps of one epoch as the Trainer counts them (it also steps on an epoch's last, partial
    accumulation window)."""
    try:
        batches = len(train_dataloader)
    except TypeError:
        raise ValueError(
            "the train dataloader has no length, so the optimizer steps per epoch are unknown; "
            "pass GMPCallback(..., steps_per_epoch=...)"
        ) from None
    return max(1, math.ceil(batches / args.gradient_accumulation_steps))


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """accelerate's AcceleratedOptimizer wraps the torch optimizer and steps it (or skips it on
    inf gradients); the step hook must sit on the wrapped one, which really steps."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class GMPCallback(TrainerCallback):
    """Gradual magnitude pruning of the Trainer's model, driven by its optimizer.

    The controller (``self.gmp``) is built in ``on_train_begin``, after the Trainer created the
    optimizer; ``steps_per_epoch`` defaults to :func:`optimizer_steps_per_epoch`. Every
    checkpoint folder gets a ``gmp_ext.pt``; a resumed run (``state.global_step > 0``) loads it
    from ``args.resume_from_checkpoint`` if that folder has one, else from
    ``<output_dir>/checkpoint-<global_step>`` (``Trainer.train(resume_from_checkpoint=...)``
    does not pass its folder to callbacks). ``gmp_kwargs`` go to
    :class:`gmp_ext.controller.GMP`.
    """

    def __init__(
        self,
        schedule: GMPSchedule,
        *,
        steps_per_epoch: int | None = None,
        remove_on_train_end: bool = False,
        **gmp_kwargs: Any,
    ) -> None:
        self.schedule = schedule
        self.steps_per_epoch = steps_per_epoch
        self.remove_on_train_end = remove_on_train_end
        self.gmp_kwargs = gmp_kwargs
        self.gmp: GMP | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None or optimizer is None:
            raise ValueError("GMPCallback needs the model and the optimizer from the Trainer")
        steps = self.steps_per_epoch or optimizer_steps_per_epoch(args, train_dataloader)
        saved = self._saved_state(args, state) if state.global_step > 0 else None
        self.gmp = start_gmp(
            model, _torch_optimizer(optimizer), self.schedule, steps, saved, self.gmp_kwargs
        )

    @staticmethod
    def _saved_state(args: TrainingArguments, state: TrainerState) -> dict[str, Any]:
        folders = [os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")]
        if isinstance(args.resume_from_checkpoint, str):
            folders.insert(0, args.resume_from_checkpoint)
        for folder in folders:
            path = os.path.join(folder, CHECKPOINT_FILE)
            if os.path.isfile(path):
                return torch.load(path, map_location="cpu", weights_only=True)
        raise FileNotFoundError(
            f"resuming at step {state.global_step}, but no {CHECKPOINT_FILE} with the GMP state "
            f"is in {folders}; Trainer.train(resume_from_checkpoint=...) does not tell callbacks "
            "its folder, so for one outside output_dir set "
            "TrainingArguments(resume_from_checkpoint=folder) too"
        )

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.gmp is not None and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            torch.save(self.gmp.state_dict(), os.path.join(folder, CHECKPOINT_FILE))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.remove_on_train_end and self.gmp is not None:
            self.gmp.remove()
            self.gmp = None
