"""Hugging Face Trainer callbacks: ``Trainer(..., callbacks=[GMPCallback(schedule)])``, or for
fine-tuning a pretrained transformer, the preset with its learning rate in one call:
``Trainer(..., callbacks=[GMPCallback.pretrained_transformer(0.9)])``."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:
    raise ImportError(
        "gmp_ext.integrations.transformers needs Transformers: pip install transformers"
    ) from exc

from gmp_ext.deploy.exporter import export
from gmp_ext.integrations import start_gmp
from gmp_ext.training.controller import GMP
from gmp_ext.training.lr_schedule import PruningRestarts, TransformerRecipe, pretrained_transformer
from gmp_ext.training.schedule import GMPSchedule
from gmp_ext.training.telemetry import scalars

__all__ = [
    "CHECKPOINT_FILE",
    "GMPCallback",
    "PretrainedTransformerCallback",
    "checkpoint_file",
    "optimizer_steps_per_epoch",
]

CHECKPOINT_FILE = "gmp_ext.pt"


def checkpoint_file(gmp: GMP | None = None) -> str:
    """The GMP state's file name in a checkpoint folder: ``gmp_ext.pt``, or
    ``gmp_ext-rank<r>.pt`` on every rank when the pruned parameters are sharded (FSDP2 /
    DTensor), since each rank then holds the masks of its own shards."""
    sharded = gmp.sharded if gmp is not None else False
    if sharded and dist.is_available() and dist.is_initialized():
        return f"gmp_ext-rank{dist.get_rank()}.pt"
    return CHECKPOINT_FILE


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


def _output_dir(args: TrainingArguments) -> str:
    # TrainingArguments always sets one (its default is "trainer_output").
    return str(args.output_dir)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """accelerate's AcceleratedOptimizer wraps the torch optimizer and steps it (or skips it on
    inf gradients); the step hook must sit on the wrapped one, which really steps."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class GMPCallback(TrainerCallback):
    """Gradual magnitude pruning of the Trainer's model, driven by its optimizer.

    The controller (``self.gmp``) is built in ``on_train_begin``, after the Trainer created the
    optimizer; ``steps_per_epoch`` defaults to :func:`optimizer_steps_per_epoch`. Every
    checkpoint folder gets a ``gmp_ext.pt`` (written by the main process), or with sharded
    parameters (FSDP2) a ``gmp_ext-rank<r>.pt`` from every rank; a resumed run
    (``state.global_step > 0``) loads it from ``args.resume_from_checkpoint`` if that folder
    has one, else from ``<output_dir>/checkpoint-<global_step>``
    (``Trainer.train(resume_from_checkpoint=...)`` does not pass its folder to callbacks).
    ``gradient_accumulation_steps`` is taken from the Trainer's arguments, and the run's
    planned length (``state.max_steps``) is checked against the schedule at the start, the
    steps taken at the end (:meth:`gmp_ext.GMP.check_run_length`).

    Telemetry: after a step with a mask update the callback asks the Trainer to log
    (``control.should_log``) and adds the update's :func:`gmp_ext.training.telemetry.scalars`
    (``gmp/churn``, ``gmp/<layer>/regrowth``, ...; ``log_layers=False``: totals only) to that
    ``Trainer.log`` call's ``logs`` and to its ``trainer.state.log_history`` entry, so the
    callbacks after this one (the console printer, your own) and ``trainer_state.json`` have
    them. The Trainer runs its ``report_to`` integrations before user callbacks: for
    TensorBoard, also call ``callback.gmp.log_to(SummaryWriter(...))`` (e.g. in a callback's
    ``on_train_begin`` placed after this one). ``gmp_kwargs`` go to
    :class:`gmp_ext.training.controller.GMP`.

    ``export_to``: a directory the main process writes the model to at the end of training
    with :func:`gmp_ext.export` (its ``save_pretrained`` checkpoint, dense with its exact zeros,
    and the mask sidecar; before ``remove_on_train_end`` drops the masks). Sharded (FSDP2)
    parameters and ``export_to`` are a ValueError at the start of training.

    :meth:`pretrained_transformer` is the preset for fine-tuning a pretrained transformer, its
    learning rate included.
    """

    def __init__(
        self,
        schedule: GMPSchedule,
        *,
        steps_per_epoch: int | None = None,
        remove_on_train_end: bool = False,
        log_layers: bool = True,
        export_to: str | os.PathLike[str] | None = None,
        **gmp_kwargs: Any,
    ) -> None:
        self.schedule = schedule
        self.export_to = export_to
        self.steps_per_epoch = steps_per_epoch
        self.remove_on_train_end = remove_on_train_end
        self.log_layers = log_layers
        self._logged = 0  # records of gmp.history already added to the Trainer's logs
        self.gmp_kwargs = gmp_kwargs
        self.gmp: GMP | None = None

    @classmethod
    def pretrained_transformer(
        cls,
        sparsity: float,
        *,
        first_step: float = 0.7,
        steps_per_epoch: int | None = None,
        remove_on_train_end: bool = False,
        log_layers: bool = True,
        export_to: str | os.PathLike[str] | None = None,
        **gmp_kwargs: Any,
    ) -> PretrainedTransformerCallback:
        """GMP to ``sparsity`` with :func:`gmp_ext.training.lr_schedule.pretrained_transformer`,
        built for the Trainer's run and with its learning rate: ``Trainer(...,
        callbacks=[GMPCallback.pretrained_transformer(0.9)])``. See
        :class:`PretrainedTransformerCallback`."""
        return PretrainedTransformerCallback(
            sparsity,
            first_step=first_step,
            steps_per_epoch=steps_per_epoch,
            remove_on_train_end=remove_on_train_end,
            log_layers=log_layers,
            export_to=export_to,
            **gmp_kwargs,
        )

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
        kwargs = {"gradient_accumulation_steps": args.gradient_accumulation_steps}
        kwargs.update(self.gmp_kwargs)
        # The saved state is read once the controller exists: its file name depends on whether
        # the parameters are sharded.
        resuming = state.global_step > 0
        self.gmp = start_gmp(
            model, _torch_optimizer(optimizer), self.schedule, steps, None, kwargs, resuming
        )
        self._logged = 0
        if resuming:
            self.gmp.load_state_dict(self._saved_state(args, state, checkpoint_file(self.gmp)))
            self._logged = len(self.gmp.history)
        if state.max_steps and state.max_steps > 0:
            self.gmp.check_run_length(state.max_steps)
        if self.export_to is not None and self.gmp.sharded:
            raise ValueError(
                f"export_to={str(self.export_to)!r}: the pruned parameters are sharded (FSDP2), "
                "and gmp_ext.export writes full tensors from one process; gather a full state "
                "dict after training and export an unsharded copy instead"
            )

    @staticmethod
    def _saved_state(args: TrainingArguments, state: TrainerState, name: str) -> dict[str, Any]:
        folders = [os.path.join(_output_dir(args), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")]
        if isinstance(args.resume_from_checkpoint, str):
            folders.insert(0, args.resume_from_checkpoint)
        for folder in folders:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return torch.load(path, map_location="cpu", weights_only=True)
        raise FileNotFoundError(
            f"resuming at step {state.global_step}, but no {name} with the GMP state is in "
            f"{folders}; Trainer.train(resume_from_checkpoint=...) does not tell callbacks its "
            "folder, so for one outside output_dir set "
            "TrainingArguments(resume_from_checkpoint=folder) too"
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.gmp is not None and len(self.gmp.history) > self._logged:
            control.should_log = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.gmp is None or logs is None:
            return
        history = self.gmp.history
        metrics: dict[str, float] = {}
        for record in history[self._logged :]:  # at most the update of this step and step 0's
            metrics.update(scalars(record, "gmp", self.log_layers))
        self._logged = len(history)
        logs.update(metrics)
        if metrics and state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.gmp is None:
            return
        name = checkpoint_file(self.gmp)
        if name != CHECKPOINT_FILE or state.is_world_process_zero:
            folder = os.path.join(_output_dir(args), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.gmp.state_dict(), os.path.join(folder, name))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.gmp is not None:
            self.gmp.check_run_length(self.gmp.step_count)
        if self.gmp is not None and self.export_to is not None and state.is_world_process_zero:
            model = kwargs.get("model")
            if model is None:
                raise ValueError("GMPCallback(export_to=...) needs the model from the Trainer")
            export(model, self.export_to)
        if self.remove_on_train_end and self.gmp is not None:
            self.gmp.remove()
            self.gmp = None


def _check_trainer_schedule(args: TrainingArguments, max_steps: int) -> None:
    """The preset replaces the Trainer's learning-rate schedule: one the user chose otherwise
    would be ignored, so it is an error."""
    kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if kind not in ("linear", "constant"):
        raise ValueError(
            "GMPCallback.pretrained_transformer sets the learning rate (back at its peak after "
            "every pruning update): TrainingArguments lr_scheduler_type must be 'linear' (the "
            f"default, which it replaces) or 'constant', got {kind!r}"
        )
    if args.get_warmup_steps(max_steps):
        raise ValueError(
            "GMPCallback.pretrained_transformer sets the learning rate (the peak from the first "
            f"step): TrainingArguments warmup_steps must be 0, got {args.warmup_steps!r}"
        )


def _lambda_lr(scheduler: Any, factor: PruningRestarts) -> torch.optim.lr_scheduler.LambdaLR:
    """The Trainer's LambdaLR, checked to be at the preset's rate for the next step (a fresh
    run's linear or constant schedule starts at the peak, as the preset does; a resumed run's
    rate comes from its checkpoint)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(
            "GMPCallback.pretrained_transformer sets the learning-rate factor of the Trainer's "
            f"LambdaLR, but the Trainer's scheduler is a {type(scheduler).__name__}; let the "
            "Trainer create it (no scheduler in Trainer(optimizers=...), no DeepSpeed scheduler)"
        )
    step = scheduler.last_epoch
    rates = [group["lr"] for group in scheduler.optimizer.param_groups]
    wanted = [base * factor(step) for base in scheduler.base_lrs]
    if not all(math.isclose(r, w, rel_tol=1e-9, abs_tol=1e-15) for r, w in zip(rates, wanted)):
        raise ValueError(
            f"the Trainer's learning rates for optimizer step {step + 1} are {rates}, the "
            f"preset's {wanted}: a scheduler passed to the Trainer, or a checkpoint of a run "
            "without GMPCallback.pretrained_transformer?"
        )
    return scheduler


class PretrainedTransformerCallback(TrainerCallback):
    """:func:`gmp_ext.training.lr_schedule.pretrained_transformer` in a Trainer, its learning rate
    included; made by :meth:`GMPCallback.pretrained_transformer`.

    At ``on_train_begin`` it builds the preset (``self.recipe``) for the run the Trainer is
    about to do: ``state.max_steps`` optimizer steps (``max_steps``, or ``num_train_epochs``
    epochs) of ``steps_per_epoch`` (default :func:`optimizer_steps_per_epoch`); runs a
    :class:`GMPCallback` with its schedule (``self.pruning``; its controller is ``self.gmp``);
    and makes the Trainer's own scheduler, a ``LambdaLR``, follow the preset's factor
    (:class:`gmp_ext.training.lr_schedule.PruningRestarts`): ``learning_rate`` is the peak, reached
    again right after every pruning update. That replaces the Trainer's schedule, so
    ``lr_scheduler_type`` must be ``"linear"`` (the default) or ``"constant"`` and there must be
    no warmup, else a ValueError at the start of training (as for a run under 16 steps).
    Checkpoints and resuming work as with :class:`GMPCallback` (the factor's state is builtins,
    saved with the Trainer's scheduler). ``export_to`` works as with :class:`GMPCallback`.
    ``gmp_kwargs`` go to :class:`gmp_ext.training.controller.GMP`.
    """

    def __init__(
        self,
        sparsity: float,
        *,
        first_step: float = 0.7,
        steps_per_epoch: int | None = None,
        remove_on_train_end: bool = False,
        log_layers: bool = True,
        export_to: str | os.PathLike[str] | None = None,
        **gmp_kwargs: Any,
    ) -> None:
        # Checks sparsity and first_step now, not when training starts (16 steps: the shortest
        # run the preset takes).
        pretrained_transformer(sparsity, first_step=first_step, total_steps=16)
        self.sparsity = sparsity
        self.first_step = first_step
        self.steps_per_epoch = steps_per_epoch
        self.remove_on_train_end = remove_on_train_end
        self.log_layers = log_layers
        self.export_to = export_to
        self.gmp_kwargs = gmp_kwargs
        self.recipe: TransformerRecipe | None = None
        self.pruning: GMPCallback | None = None

    @property
    def gmp(self) -> GMP | None:
        """The controller of the current run (None before training starts)."""
        return None if self.pruning is None else self.pruning.gmp

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        lr_scheduler: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        _check_trainer_schedule(args, state.max_steps)
        steps = self.steps_per_epoch or optimizer_steps_per_epoch(args, train_dataloader)
        recipe = pretrained_transformer(
            self.sparsity,
            first_step=self.first_step,
            total_steps=state.max_steps,
            steps_per_epoch=steps,
        )
        scheduler = _lambda_lr(lr_scheduler, recipe.lr_lambda)
        pruning = GMPCallback(
            recipe.schedule,
            steps_per_epoch=steps,
            remove_on_train_end=self.remove_on_train_end,
            log_layers=self.log_layers,
            export_to=self.export_to,
            **self.gmp_kwargs,
        )
        pruning.on_train_begin(args, state, control, train_dataloader=train_dataloader, **kwargs)
        scheduler.lr_lambdas = [recipe.lr_lambda] * len(scheduler.lr_lambdas)
        self.recipe, self.pruning = recipe, pruning

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.pruning is not None:
            self.pruning.on_step_end(args, state, control, **kwargs)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.pruning is not None:
            self.pruning.on_log(args, state, control, **kwargs)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.pruning is not None:
            self.pruning.on_save(args, state, control, **kwargs)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.pruning is not None:
            self.pruning.on_train_end(args, state, control, **kwargs)
