"""Lightning callback: ``Trainer(callbacks=[GMPCallback(schedule, fine_tune_weight_decay=0.0)])``.

Works with ``lightning`` (``lightning.pytorch``) or the older ``pytorch_lightning`` package.
"""

from __future__ import annotations

import math
import os
from typing import Any

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:
    try:
        from pytorch_lightning import (  # type: ignore[assignment]  # the same API, older name
            Callback,
            LightningModule,
            Trainer,
        )
    except ImportError as exc:
        raise ImportError(
            "gmp_ext.integrations.lightning needs Lightning: pip install lightning"
        ) from exc

from gmp_ext.deploy.exporter import export
from gmp_ext.integrations import start_gmp
from gmp_ext.training.controller import GMP
from gmp_ext.training.schedule import GMPSchedule
from gmp_ext.training.telemetry import scalars

__all__ = ["CHECKPOINT_KEY", "GMPCallback", "optimizer_steps_per_epoch"]

CHECKPOINT_KEY = "gmp_ext"


def optimizer_steps_per_epoch(trainer: Trainer) -> int:
    """``ceil(num_training_batches / accumulate_grad_batches)``: Lightning also steps on an
    epoch's last batch when the accumulation window is not full."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError(
            "the train dataloader has no length, so the optimizer steps per epoch are unknown; "
            "pass GMPCallback(..., steps_per_epoch=...)"
        )
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


class GMPCallback(Callback):
    """Gradual magnitude pruning of the LightningModule, driven by the trainer's first optimizer.

    The controller (``self.gmp``) is built in ``on_train_start``, once the dataloader's length
    is known; ``steps_per_epoch`` defaults to :func:`optimizer_steps_per_epoch`. Its state is
    saved in checkpoints under ``checkpoint["gmp_ext"]`` and restored by ``Trainer.fit(...,
    ckpt_path=...)``. ``gradient_accumulation_steps`` is the trainer's
    ``accumulate_grad_batches``; the planned steps (``estimated_stepping_batches``) are checked
    against the schedule at the start, the steps taken at the end
    (:meth:`gmp_ext.GMP.check_run_length`). Every mask update's telemetry goes to the
    trainer's loggers (``trainer.loggers``: TensorBoard, CSV, W&B, ...) at the update's step,
    at the end of the batch it falls in, as :func:`gmp_ext.training.telemetry.scalars` names it
    (``gmp/churn``, ``gmp/<layer>/regrowth``, ...; ``log_layers=False``: totals only; a resumed
    run logs the updates after its checkpoint). ``export_to``: a directory the global-zero
    process writes the LightningModule to at the end of ``fit`` with :func:`gmp_ext.export`
    (``model.safetensors`` and the mask sidecar, names as the module's state dict has them;
    before ``remove_on_fit_end`` drops the masks); sharded (FSDP2) parameters and
    ``export_to`` are a ValueError at the start of training. ``gmp_kwargs`` go to
    :class:`gmp_ext.training.controller.GMP`.
    """

    def __init__(
        self,
        schedule: GMPSchedule,
        *,
        steps_per_epoch: int | None = None,
        remove_on_fit_end: bool = False,
        log_layers: bool = True,
        export_to: str | os.PathLike[str] | None = None,
        **gmp_kwargs: Any,
    ) -> None:
        super().__init__()
        self.export_to = export_to
        self.schedule = schedule
        self.steps_per_epoch = steps_per_epoch
        self.remove_on_fit_end = remove_on_fit_end
        self.log_layers = log_layers
        self._logged = 0  # records of gmp.history already sent to the loggers
        self.gmp_kwargs = gmp_kwargs
        self.gmp: GMP | None = None
        self._saved: dict[str, Any] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        steps = self.steps_per_epoch or optimizer_steps_per_epoch(trainer)
        kwargs = {"gradient_accumulation_steps": trainer.accumulate_grad_batches}
        kwargs.update(self.gmp_kwargs)
        self.gmp = start_gmp(
            pl_module, trainer.optimizers[0], self.schedule, steps, self._saved, kwargs
        )
        self._logged = 0 if self._saved is None else len(self.gmp.history)
        self._saved = None
        planned = trainer.estimated_stepping_batches
        if math.isfinite(planned):
            self.gmp.check_run_length(int(planned))
        if self.export_to is not None and self.gmp.sharded:
            raise ValueError(
                f"export_to={str(self.export_to)!r}: the pruned parameters are sharded (FSDP2), "
                "and gmp_ext.export writes full tensors from one process; gather a full state "
                "dict after training and export an unsharded copy instead"
            )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, index: int
    ) -> None:
        if self.gmp is None:
            return
        history = self.gmp.history
        for record in history[self._logged :]:
            metrics = scalars(record, "gmp", self.log_layers)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=record["step"])
        self._logged = len(history)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.gmp is not None:
            checkpoint[CHECKPOINT_KEY] = self.gmp.state_dict()

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Called before the optimizers exist; the controller loads it in on_train_start.
        self._saved = checkpoint.get(CHECKPOINT_KEY)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.gmp is not None:
            self.gmp.check_run_length(self.gmp.step_count)
        if self.gmp is not None and self.export_to is not None and trainer.is_global_zero:
            export(pl_module, self.export_to)
        if self.remove_on_fit_end and self.gmp is not None:
            self.gmp.remove()
            self.gmp = None
