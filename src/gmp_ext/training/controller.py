"""The GMP training controller: gradual magnitude pruning driven by the optimizer's own steps.

Timing (step ``s`` = number of ``optimizer.step()`` calls that ran, epoch = ``s /
steps_per_epoch``):

* At construction (step 0, epoch 0) the masks are computed at once if the schedule has an
  update point at epoch <= 0 (``start_epoch == 0``).
* After every optimizer step ``s`` (a step post-hook, so ``loss.backward(); optimizer.step()``
  is all a training loop writes) the existing masks are re-applied; then, if an update point
  ``t`` with ``(s - 1) / spe < t <= s / spe`` exists, fresh masks are computed from the weights
  the step just produced, at ``schedule.sparsity_at(s / spe)``. Pruned weights are therefore
  zero when the masks are recomputed and stay pruned as the sparsity grows, and every layer
  holds exactly ``round(target * numel)`` zeros right after an update.
* Steps that never reach ``optimizer.step()`` (micro-batches of gradient accumulation, steps a
  ``GradScaler`` skips on inf/NaN gradients) are not counted, nor those a ``GradScaler`` hands
  to an optimizer that skips them itself (fused Adam(W), SGD, Adagrad: ``optimizer.step()`` runs
  with ``optimizer.found_inf`` set). That flag is a device tensor, and reading it waits for the
  device: it is summed where it lives and read only when an update point or a stage change
  may fall on one of the steps not read yet, when ``step_count`` (``epoch``, ``sparsity``,
  ``stage``) is asked for, and by ``state_dict``, ``epoch_end`` and ``plot``.
* When step ``s`` reaches ``end_epoch`` (the stage becomes ``"fine_tuning"``), the weight decay
  of every param group becomes ``fine_tune_weight_decay`` (if given), from step ``s + 1`` on.

A schedule may be written in optimizer steps instead of epochs: pass ``steps_per_epoch=1``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gmp_ext import distributed
from gmp_ext.exceptions import GMPWarning, warn
from gmp_ext.kernels.dtensors import any_dtensor
from gmp_ext.model.mask_store import MaskStore, ensure_store, get_store
from gmp_ext.model.parameters import ParamSpec, parameter_by_name, select_parameters, unwrap
from gmp_ext.pruning.pruner import mask_gradients_hook, optimizer_state_of, prune_parameters, remove
from gmp_ext.pruning.strategies import Selection
from gmp_ext.scores import ScoreSpec
from gmp_ext.training import checkpoint
from gmp_ext.training.config import GMPConfig, check_in_optimizer
from gmp_ext.training.recipes import Recipe, load_recipe
from gmp_ext.training.run_checks import (
    PassCounter,
    check_counts,
    check_epoch_steps,
    check_run_length,
)
from gmp_ext.training.schedule import GMPSchedule, Schedule, Stage
from gmp_ext.training.telemetry import ScalarWriter, UpdateProbe, Writers

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch.utils.hooks import RemovableHandle

__all__ = ["GMP", "GMPWarning"]


def _found_inf(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The flag a ``GradScaler`` sets on an optimizer that handles the scaling itself
    (``_step_supports_amp_scaling``: the fused ones) for the duration of its ``step()``: nonzero
    when the gradients hold inf/NaN and the step changed nothing. None for other optimizers,
    whose skipped steps never reach ``optimizer.step()``."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    found_inf = getattr(optimizer, "found_inf", None)
    return found_inf if isinstance(found_inf, torch.Tensor) else None


class _Unread:
    """Optimizer steps whose ``found_inf`` flag is not read yet, and on the flags' device how
    many of them were skipped."""

    def __init__(self) -> None:
        self.steps = 0
        self.skipped: torch.Tensor | None = None

    def add(self, found_inf: torch.Tensor) -> None:
        # found_inf sums the flags of the gradients' devices: any nonzero skipped the step.
        skipped = found_inf > 0
        if self.skipped is None:
            self.skipped = torch.zeros((), dtype=torch.int64, device=found_inf.device)
        self.skipped.add_(skipped.to(self.skipped.device))
        self.steps += 1

    def read(self) -> int:
        """How many of the steps ran (waits for the device); forgets them."""
        ran = self.steps - (0 if self.skipped is None else int(self.skipped.item()))
        self.steps, self.skipped = 0, None
        return ran


class GMP:
    """Gradual magnitude pruning of ``model`` while ``optimizer`` trains it.

    ``params`` / ``exclude`` choose the parameters as :func:`gmp_ext.select_parameters` does;
    frozen ones may be outside the optimizer, trainable ones must be in it. The other options
    are validated into ``gmp.config`` (:class:`gmp_ext.training.config.GMPConfig` says what each
    does). A second ``GMP`` on the same model replaces this one (detached, with a GMPWarning);
    ``attach`` hooks on the same optimizer are removed.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        *,
        steps_per_epoch: int,
        scope: str = "layer",
        params: ParamSpec = None,
        exclude: Sequence[str] | str | None = None,
        layer_sparsity: Mapping[str, float] | None = None,
        max_sparsity: Mapping[str, float] | None = None,
        fine_tune_weight_decay: float | None = None,
        total_epochs: float | None = None,
        mask_optimizer_state: bool = True,
        mask_gradients: bool = False,
        gradient_accumulation_steps: int | None = None,
        nm: tuple[int, int] | None = None,
        score: ScoreSpec = None,
        selection: Selection | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        options: dict[str, Any] = {
            "steps_per_epoch": steps_per_epoch,
            "scope": scope,
            "layer_sparsity": layer_sparsity,
            "max_sparsity": max_sparsity,
            "fine_tune_weight_decay": fine_tune_weight_decay,
            "total_epochs": total_epochs,
            "mask_optimizer_state": mask_optimizer_state,
            "mask_gradients": mask_gradients,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "nm": nm,
            "score": score,
            "selection": selection,
        }
        selected = select_parameters(model, params, exclude)
        check_in_optimizer(optimizer, selected)
        self.config = GMPConfig.create(schedule, optimizer, list(selected), **options)
        self.schedule: Schedule = self.config.schedule
        if self.schedule.crossed_update(-float("inf"), 0.0) and not self.config.score.in_place:
            raise ValueError(  # before the model is touched: nothing to undo
                f"score {self.config.score.name!r} ranks what it observes in training, but the "
                "schedule prunes at epoch 0, before any step: start it later (start_epoch > 0)"
            )
        # The score refuses a layer before it hooks any, and before the model is touched; its
        # hooks come first: a movement score reads the gradients before the step.
        score_handles = self.config.score.attach(model, list(selected), optimizer)
        self.steps_per_epoch = self.config.steps_per_epoch
        self.scope = self.config.scope
        store = ensure_store(model)

        self._model = model
        self._optimizer = optimizer
        self._names = list(selected)
        self._selection = self.config.selection({n: p.numel() for n, p in selected.items()})
        self._progress = checkpoint.Progress()  # its step counts the steps read so far
        self._unread = _Unread()
        self._passes = PassCounter(self.config.gradient_accumulation_steps)
        self._store = store
        self._writers = Writers()
        self._take_over(store)

        if len(optimizer.state):
            warn(
                "the optimizer has already taken steps before GMP was created; those steps are "
                "not counted and the schedule starts at epoch 0 now (to resume a run, load the "
                "GMP state with load_state_dict)"
            )
        if self.schedule.crossed_update(-float("inf"), 0.0):
            self._update()
        self._handles = [*score_handles, optimizer.register_step_post_hook(self._after_step)]
        if self.config.mask_gradients:
            self._handles.append(optimizer.register_step_pre_hook(mask_gradients_hook(store)))
        trainable = [*selected.values(), *(p for g in optimizer.param_groups for p in g["params"])]
        self._handles.extend(self._passes.attach(unwrap(model)[0], trainable))
        store.hooks.extend(self._handles)

    def _take_over(self, store: MaskStore) -> None:
        """Become the model's one controller: a live one (a notebook cell run twice) is
        detached with a GMPWarning."""
        previous = store.replace_controller(self, self._optimizer)
        if isinstance(previous, GMP):
            warn(
                f"this model already had a GMP controller (at step {previous.step_count}, "
                f"target {previous.sparsity:.4g}); it is detached and this one replaces it. Its "
                "masks stay until this controller's first update (gmp_ext.remove(model) drops "
                "them)"
            )
            previous._detach()

    @classmethod
    def from_recipe(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        recipe_or_path: Recipe | str | os.PathLike[str] | Mapping[str, Any],
        *,
        steps_per_epoch: int,
        **kwargs: Any,
    ) -> GMP:
        """A controller from a recipe (see :func:`gmp_ext.training.recipes.load_recipe`).

        The recipe supplies the schedule, ``params`` (names or patterns, SparseML's ``re:``
        prefix included), ``scope`` (``global_sparsity: true`` -> ``"global"``),
        ``fine_tune_weight_decay`` and ``total_epochs``; keyword arguments override them.
        """
        recipe = (
            recipe_or_path if isinstance(recipe_or_path, Recipe) else load_recipe(recipe_or_path)
        )
        options = {**recipe.gmp_options(), **kwargs}
        return cls(model, optimizer, recipe.schedule, steps_per_epoch=steps_per_epoch, **options)

    # -- configuration and progress ---------------------------------------------------------

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose steps drive the schedule."""
        return self._optimizer

    @property
    def step_count(self) -> int:
        """Optimizer steps taken since the controller was created (or of the resumed run); with
        a fused optimizer under a GradScaler, asking waits for the device (see the module
        docstring)."""
        self._read_flags()
        return self._progress.step

    @property
    def epoch(self) -> float:
        """``step_count / steps_per_epoch``: the schedule's clock."""
        return self.step_count / self.steps_per_epoch

    @property
    def sparsity(self) -> float:
        """The schedule's target at the current epoch (layers with their own final target
        follow it scaled; see the class docstring)."""
        return self.schedule.sparsity_at(self.epoch)

    @property
    def stage(self) -> Stage:
        """``"stabilization"``, ``"pruning"`` or ``"fine_tuning"`` at the current epoch."""
        return self.schedule.stage_at(self.epoch)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per mask update: ``{"epoch", "step", "target", "stage", "achieved",
        "ties", "regrowth", "newly_pruned", "revived", "churn", "layers": {name: {"target",
        "achieved", "threshold", "ties", "regrowth", "newly_pruned", "revived", "churn"}}}``
        (:mod:`gmp_ext.training.telemetry` defines each; ``achieved`` counts the zeros in the
        weights)."""
        return list(self._progress.history)

    @property
    def last_update(self) -> dict[str, Any] | None:
        """``{"step", "epoch", "target"}`` of the last mask update, None before the first."""
        last = self._progress.last_update
        return None if last is None else dict(last)

    @property
    def sharded(self) -> bool:
        """Whether some pruned parameter is sharded (FSDP2): each rank saves its own state."""
        return any_dtensor(list(self._current_params().values()))

    def layer_targets(self, sparsity: float | None = None) -> dict[str, float]:
        """{name: target} for a schedule value (default: the current one)."""
        return self.config.layer_targets(
            self._names, self.sparsity if sparsity is None else sparsity
        )

    def check_run_length(self, total_steps: int) -> bool:
        """Whether ``total_steps`` optimizer steps reach ``end_epoch`` (a GMPWarning saying where
        the run stops when not); the Lightning and Hugging Face callbacks call it."""
        return check_run_length(self.schedule, self.steps_per_epoch, total_steps)

    # -- the step hook ----------------------------------------------------------------------

    def _after_step(self, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        ran = self._ran(_found_inf(optimizer))
        spe = self.steps_per_epoch
        # The steps counted so far: nothing is due on those not read yet (see _ran).
        previous = self._progress.step / spe
        if ran:
            self._progress.step += 1
        current = self._progress.step / spe
        self._passes.step(self.schedule, spe)
        update = self.schedule.crossed_update(previous, current)
        # At an update, the regrowth the re-apply is about to zero is counted first.
        probe = UpdateProbe(self._store, self._names) if update else None
        # Re-zero first, also before an update: momentum and weight decay may have moved pruned
        # weights off zero in this step, and they must not outrank kept weights in the new masks.
        # A skipped step moved nothing, so the re-apply changes nothing then.
        self._store.apply()
        if probe is not None:
            self._update(probe)
        decay = self.config.fine_tune_weight_decay
        if decay is not None and self.schedule.stage_at(current) == "fine_tuning":
            self._progress.start_fine_tuning(self._optimizer, decay)

    def _ran(self, found_inf: torch.Tensor | None) -> bool | None:
        """Whether the step that just ended ran: True, False (a GradScaler skipped it), or None
        when its found_inf flag joins the unread ones, since no update point and no stage change
        lies within the steps not read yet, however many of them ran. When one may, the flags
        are read (which waits for the device)."""
        if found_inf is None and not self._unread.steps:
            return True
        spe, low = self.steps_per_epoch, self._progress.step
        first, last = low / spe, (low + self._unread.steps + 1) / spe
        due = self.schedule.crossed_update(first, last)
        if not due and self.schedule.stage_at(first) == self.schedule.stage_at(last):
            if found_inf is None:
                return True
            self._unread.add(found_inf)
            return None
        self._read_flags()
        return found_inf is None or not bool(found_inf.item())

    def _read_flags(self) -> None:
        """Count the steps whose found_inf flag is not read yet (waits for the device)."""
        self._progress.step += self._unread.read()

    def _current_params(self) -> dict[str, nn.Parameter]:
        """The pruned parameters as the model holds them now, looked up by name: loading a
        state_dict with ``assign=True`` or a dtype conversion may have replaced them."""
        inner = unwrap(self._model)[0]
        try:
            return {name: parameter_by_name(inner, name) for name in self._names}
        except KeyError as error:
            raise ValueError(f"GMP: the model no longer has the pruned parameter {error}") from None

    def _update(self, probe: UpdateProbe | None = None) -> None:
        """Fresh masks at the scheduled target, applied; then record and check the result."""
        target = self.sparsity
        targets = self.layer_targets(target)
        params = self._current_params()
        probe = probe or UpdateProbe(self._store, self._names)
        prune_parameters(
            self._model,
            params,
            targets,
            self._selection,
            lambda entries: probe.inspect(entries, self._selection, targets),
            score=self.config.score,
        )
        if self.config.mask_optimizer_state:
            self._store.apply_to(optimizer_state_of(self._optimizer), names=self._names)
        zeros = dict(zip(self._names, distributed.zero_counts(list(params.values()))))
        thresholds = {n: self._store.entries[n].threshold for n in self._names}
        layers, totals = probe.record_layers(params, targets, zeros, thresholds)
        self._writers.emit(self._progress.record(self.epoch, target, self.stage, layers, totals))
        check_counts(self._progress.step, self._selection, params, targets, zeros)

    # -- user hooks -------------------------------------------------------------------------

    def epoch_end(self) -> None:
        """Optional: tell the controller an epoch ended, so it can check ``steps_per_epoch``
        against the optimizer steps since the last call (a GMPWarning when they differ)."""
        steps = self.step_count
        check_epoch_steps(steps - self._progress.epoch_mark, self.steps_per_epoch)
        self._progress.epoch_mark = steps

    def log_to(
        self, writer: ScalarWriter, *, prefix: str = "gmp", layers: bool = True
    ) -> RemovableHandle:
        """Write every update's telemetry to ``writer`` (anything with ``add_scalar(tag, value,
        step)``: ``torch.utils.tensorboard.SummaryWriter``) at the update's optimizer step: the
        updates so far at once, later ones as they happen. Tags:
        :func:`gmp_ext.training.telemetry.scalars`. Returns a handle; ``handle.remove()`` stops
        it."""
        return self._writers.add(writer, prefix, layers, self._progress.history)

    def plot(self, path: str | os.PathLike[str] | None = None) -> Figure:
        """Per-layer achieved sparsity over the run against the schedule (needs matplotlib;
        before the first update, the scheduled target alone; a schedule other than a
        GMPSchedule is drawn from the update records); returns the matplotlib Figure and
        saves a PNG to ``path`` if given."""
        from gmp_ext.training.plotting import plot_sparsity_history

        return plot_sparsity_history(
            self._progress.history,
            path,
            schedule=self.schedule if isinstance(self.schedule, GMPSchedule) else None,
            steps_per_epoch=self.steps_per_epoch,
            until_step=self.step_count,
        )

    def remove(self) -> None:
        """Stop pruning: drop the step hook, the masks and every hook of the model's mask store
        (:func:`gmp_ext.remove`); the weights stay as they are."""
        self._detach()
        remove(self._model)

    def _detach(self) -> None:
        """Remove this controller's hooks (the masks stay in the model's store)."""
        for handle in self._handles:
            handle.remove()
        self._store.release_controller(self)

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run bit-identically; tensors and builtins only,
        so it loads with ``torch.load(weights_only=True)``. Save the model's and the
        optimizer's state beside it."""
        store = get_store(self._model)
        if store is not None:
            store.resolve()
        entries = {} if store is None else store.entries
        self._read_flags()
        return checkpoint.encode(
            self.config, self._progress, self.stage, self._current_params(), entries
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a saved run. Raises ValueError, with nothing modified, when the state
        belongs to another model (names, shapes) or another configuration (``mask_*`` options
        and ``gradient_accumulation_steps`` may differ: they do not change the weights). Load
        the optimizer's state first: with ``mask_optimizer_state`` its pruned entries are
        zeroed here."""
        progress, entries = checkpoint.decode(
            state, self.config, self._current_params(), len(self._optimizer.param_groups)
        )
        self.config.score.load_state_dict(state.get("score_state", {}))
        self._progress = progress
        self._unread = _Unread()  # steps of the run this state replaces
        if progress.original_decay is not None:
            decay = self.config.fine_tune_weight_decay
            progress.set_decay(self._optimizer, decay)  # type: ignore[arg-type]
        for name in self._names:  # a state saved before the first update holds no masks
            if name not in entries:
                self._store.entries.pop(name, None)
        self._store.set_masks(entries)
        self._store.apply()
        if self.config.mask_optimizer_state:
            self._store.apply_to(optimizer_state_of(self._optimizer), names=list(entries))
