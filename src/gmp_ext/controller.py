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
  ``GradScaler`` skips on inf/NaN gradients) are not counted.
* When step ``s`` reaches ``end_epoch`` (the stage becomes ``"fine_tuning"``), the weight decay
  of every param group becomes ``fine_tune_weight_decay`` (if given), from step ``s + 1`` on.

A schedule may be written in optimizer steps instead of epochs: pass ``steps_per_epoch=1``.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import os
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import distributed, ops
from .exceptions import GMPWarning
from .masks import MaskEntry, MaskStore, export_mask, get_store, import_mask
from .pruner import (
    _check_flag,
    _mask_grads_hook,
    _state_of,
    prune_step,
    remove,
)
from .schedule import GMPSchedule, Recipe, Stage, load_recipe
from .selection import (
    ParamSpec,
    check_patterns,
    matches,
    parameter_by_name,
    select_parameters,
    unwrap,
)

__all__ = ["GMP", "GMPWarning"]

logger = logging.getLogger("gmp_ext")

_FORMAT = 1
# Options recorded in the config but not checked on resume: they never change the weights (nor
# the masks), only the optimizer state and gradients of pruned weights.
_UNCHECKED = ("mask_optimizer_state", "mask_gradients")


def _per_layer(
    spec: Mapping[str, float] | None, names: Sequence[str], what: str
) -> dict[str, float]:
    """{name: value} for the selected names a spec entry matches: an exact name wins, otherwise
    the first matching pattern. An entry matching nothing is an error: a typo would otherwise
    silently change the run."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise TypeError(f"{what} must be a mapping {{name or regex: sparsity}}, got {spec!r}")
    values = {key: ops.check_sparsity(v, f"{what}[{key!r}]") for key, v in spec.items()}
    check_patterns(values, names, f"{what} entries")
    result = {}
    for name in names:
        key = name if name in values else next((k for k in values if matches(k, name)), None)
        if key is not None:
            result[name] = values[key]
    return result


def _capped_global(
    params: Mapping[str, nn.Parameter], target: float, caps: Mapping[str, int]
) -> dict[str, MaskEntry]:
    """Global magnitude masks where layer ``name`` prunes at most ``caps[name]`` elements.

    A global selection over the uncapped layers; every layer above its cap is fixed at its cap
    and the selection is re-run over the rest with the budget reduced by what the fixed layers
    prune, until no cap is violated. Fixing a layer only raises the others' threshold, so a
    layer over its cap stays over it: the result is one threshold over the uncapped layers and
    exactly ``round(target * total)`` pruned in all, unless the caps leave too little room.
    """
    names = list(params)
    k = ops.prune_count(sum(p.numel() for p in params.values()), target)
    entries: dict[str, MaskEntry] = {}
    free, fixed = names, []
    while free:
        tensors = [params[n] for n in free]
        budget = min(k - sum(caps[n] for n in fixed), sum(t.numel() for t in tensors))
        rows = ops._select_rows_global(tensors, [f"parameter '{n}'" for n in free], budget)
        masks = ops._build(tensors, rows, ops._wide64(tensors))
        kept = distributed.kept_counts(tensors, masks)
        over = [n for n, t, c in zip(free, tensors, kept) if n in caps and t.numel() - c > caps[n]]
        if not over:
            # The threshold of a global selection is the cut over all of its layers.
            thresholds = ops._thresholds(rows, tensors, [1] * len(free))
            for n, m, th in zip(free, masks, thresholds):
                entries[n] = MaskEntry(params[n], m, target, th.value)
            break
        fixed += over
        free = [n for n in free if n not in over]
    if fixed:
        tensors = [params[n] for n in fixed]
        ks = [caps[n] for n in fixed]
        rows = ops._select_rows_layerwise(tensors, [f"parameter '{n}'" for n in fixed], ks)
        thresholds = ops._thresholds(rows, tensors, ks)
        for n, m, th in zip(fixed, ops._build(tensors, rows), thresholds):
            entries[n] = MaskEntry(params[n], m, target, th.value)
    return {n: entries[n] for n in names}


class GMP:
    """Gradual magnitude pruning of ``model`` while ``optimizer`` trains it.

    ``steps_per_epoch`` converts the optimizer's step count into the schedule's epochs (see the
    module docstring for the exact timing). ``scope="layer"`` prunes every selected parameter
    to the target; ``scope="global"`` prunes ``round(target * total)`` of all of them with one
    threshold. ``params`` / ``exclude`` choose the parameters as in
    :func:`gmp_ext.select_parameters` (default: every Linear / Conv / ConvTranspose weight).

    ``layer_sparsity`` ({name or regex: final sparsity}, layer scope) gives some layers their
    own final target: such a layer follows the schedule's curve scaled by
    ``layer_final / schedule.final_sparsity`` (its initial sparsity scaled alike), reaching its
    own final exactly at ``end_epoch``. ``max_sparsity`` ({name or regex: cap}, global scope)
    keeps a layer from pruning more than ``round(cap * numel)`` elements; the budget it cannot
    take goes to the other layers. Keys are names or patterns (the rule of
    :func:`gmp_ext.selection.matches`; each must match a selected parameter); an exact name
    wins over patterns, otherwise the first matching key.

    ``fine_tune_weight_decay`` replaces every param group's weight decay once fine-tuning
    starts; ``total_epochs`` (if given) must leave the schedule room to finish.

    ``gradient_accumulation_steps`` states how many training forward passes of the model make
    one optimizer step. GMP counts them (a forward pre-hook) and warns once, naming the
    ``steps_per_epoch`` that fits, when it sees more than stated: with gradient accumulation,
    ``steps_per_epoch=len(loader)`` counts micro-batches and the run ends long before the
    schedule does. Parameters that are frozen (``requires_grad=False``) may be outside the
    optimizer; trainable ones must be in it. A second ``GMP`` on the same model replaces this
    one (it is detached, with a GMPWarning); ``attach`` hooks on the same optimizer are removed.

    ``mask_optimizer_state`` (default on) zeroes, at every mask update and when
    :meth:`load_state_dict` restores masks, the optimizer state of the pruned weights (see
    :func:`gmp_ext.zero_pruned_state`), so no stale momentum or second moment survives pruning.
    ``mask_gradients`` zeroes the pruned weights' ``.grad`` entries before every optimizer
    step, so that state stays zero between updates and pruned weights never move. Neither
    changes the kept weights: a run is bit-identical with or without them.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: GMPSchedule,
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
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        _check_flag(mask_optimizer_state, "mask_optimizer_state")
        _check_flag(mask_gradients, "mask_gradients")
        if not isinstance(schedule, GMPSchedule):
            raise TypeError(
                f"schedule must be a gmp_ext.GMPSchedule, got {type(schedule).__name__}"
            )
        if (
            isinstance(steps_per_epoch, bool)
            or not isinstance(steps_per_epoch, numbers.Integral)
            or steps_per_epoch < 1
        ):
            raise ValueError(
                "steps_per_epoch must be an integer >= 1 (optimizer steps per epoch; 1 to give "
                f"the schedule in steps), got {steps_per_epoch!r}"
            )
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        if layer_sparsity is not None and scope != "layer":
            raise ValueError("layer_sparsity needs scope='layer' (use max_sparsity for global)")
        if max_sparsity is not None and scope != "global":
            raise ValueError("max_sparsity needs scope='global' (use layer_sparsity for layer)")
        if layer_sparsity and schedule.final_sparsity == 0:
            raise ValueError("layer_sparsity scales the schedule: it needs final_sparsity > 0")
        if fine_tune_weight_decay is not None:
            fine_tune_weight_decay = self._check_decay(optimizer, fine_tune_weight_decay)
        if total_epochs is not None and not (
            isinstance(total_epochs, numbers.Real)
            and not isinstance(total_epochs, bool)
            and schedule.end_epoch <= total_epochs < math.inf
        ):
            raise ValueError(
                f"total_epochs must be a finite number >= the schedule's end_epoch "
                f"({schedule.end_epoch}), got {total_epochs!r}"
            )
        if gradient_accumulation_steps is not None and (
            isinstance(gradient_accumulation_steps, bool)
            or not isinstance(gradient_accumulation_steps, numbers.Integral)
            or gradient_accumulation_steps < 1
        ):
            raise ValueError(
                "gradient_accumulation_steps must be an integer >= 1 (training forward passes "
                f"per optimizer step), got {gradient_accumulation_steps!r}"
            )
        selected = select_parameters(model, params, exclude)
        self._check_in_optimizer(optimizer, selected)
        names = list(selected)
        finals = _per_layer(layer_sparsity, names, "layer_sparsity")
        caps = _per_layer(max_sparsity, names, "max_sparsity")
        store: MaskStore = get_store(model, create=True)  # type: ignore[assignment]

        self.schedule = schedule
        self.steps_per_epoch = int(steps_per_epoch)
        self.scope = scope
        self.fine_tune_weight_decay = fine_tune_weight_decay
        self.total_epochs = None if total_epochs is None else float(total_epochs)
        self.mask_optimizer_state = mask_optimizer_state
        self.mask_gradients = mask_gradients
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self._model = model
        self._optimizer = optimizer
        self._names = names
        self._finals = finals
        self._caps = {n: ops.prune_count(selected[n].numel(), c) for n, c in caps.items()}
        self._cap_fractions = caps
        self._steps = 0
        self._epoch_mark = 0
        self._last_update: dict[str, Any] | None = None
        self._history: list[dict[str, Any]] = []
        self._original_decay: list[float] | None = None
        self._forwards = 0  # training forward passes since the last optimizer step
        self._forwards_before = 0  # ... before the last optimizer step
        self._accumulation_checked = False
        self._store = store
        self._take_over(store)

        if len(optimizer.state):
            warnings.warn(
                "the optimizer has already taken steps before GMP was created; those steps are "
                "not counted and the schedule starts at epoch 0 now (to resume a run, load the "
                "GMP state with load_state_dict)",
                GMPWarning,
                stacklevel=2,
            )
        if schedule.crossed_update(-math.inf, 0.0):
            self._update()
        self._handles = [optimizer.register_step_post_hook(self._after_step)]
        if mask_gradients:
            self._handles.append(optimizer.register_step_pre_hook(_mask_grads_hook(store)))
        self._handles.append(unwrap(model)[0].register_forward_pre_hook(self._count_forward))
        store.hooks.extend(self._handles)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose steps drive the schedule."""
        return self._optimizer

    @property
    def sharded(self) -> bool:
        """Whether some pruned parameter is sharded (FSDP2 / DTensor): then
        :meth:`state_dict` holds this rank's masks only, and every rank saves its own."""
        return distributed.any_dtensor(list(self._current_params().values()))

    @staticmethod
    def _check_in_optimizer(
        optimizer: torch.optim.Optimizer, selected: Mapping[str, nn.Parameter]
    ) -> None:
        """A trainable pruned parameter must be stepped by ``optimizer``, or its masks would be
        re-applied after steps that never train it. A frozen one (``requires_grad=False``) may
        stay out: it is pruned at every update like any other, as ``prune_step`` does."""
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in selected.items() if id(p) not in owned and p.requires_grad]
        if missing:
            raise ValueError(
                f"parameters {missing} are pruned and trainable but in no param group of the "
                f"optimizer: add them to the optimizer, or leave them out with exclude={missing}"
            )

    def _take_over(self, store: MaskStore) -> None:
        """Become the model's one controller: a live one (a notebook cell run twice) is
        detached with a GMPWarning, and attach() hooks on the same optimizer are removed, since
        this controller re-applies the masks itself."""
        previous = None if store.controller is None else store.controller()
        if isinstance(previous, GMP) and previous is not self:
            warnings.warn(
                f"this model already had a GMP controller (at step {previous.step_count}, "
                f"target {previous.sparsity:.4g}); it is detached and this one replaces it. Its "
                "masks stay until this controller's first update (gmp_ext.remove(model) drops "
                "them)",
                GMPWarning,
                stacklevel=3,
            )
            previous._detach()
        attached = store.attachments.pop(id(self._optimizer), None)
        if attached is not None:
            attached.remove()  # type: ignore[attr-defined]
        store.controller = weakref.ref(self)

    def _count_forward(self, module: nn.Module, _args: Any) -> None:
        # Compiled regions skip the count: a Python side effect there would break the graph.
        if module.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._forwards += 1

    @staticmethod
    def _check_decay(optimizer: torch.optim.Optimizer, value: object) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not 0 <= float(value) < math.inf
        ):
            raise ValueError(f"fine_tune_weight_decay must be a finite number >= 0, got {value!r}")
        if not all("weight_decay" in group for group in optimizer.param_groups):
            raise ValueError(
                f"fine_tune_weight_decay={value!r}, but {type(optimizer).__name__} has no "
                "weight_decay option"
            )
        return float(value)

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
        """A controller from a recipe (see :func:`gmp_ext.schedule.load_recipe`).

        The recipe supplies the schedule, ``params`` (names, or regexes with SparseML's ``re:``
        prefix), ``scope`` (``global_sparsity: true`` -> ``"global"``),
        ``fine_tune_weight_decay`` and ``total_epochs``; keyword arguments override them.
        """
        recipe = (
            recipe_or_path if isinstance(recipe_or_path, Recipe) else load_recipe(recipe_or_path)
        )
        options: dict[str, Any] = {
            "scope": "global" if recipe.global_sparsity else "layer",
            "params": None if recipe.params is None else list(recipe.params),
            "fine_tune_weight_decay": recipe.fine_tune_weight_decay,
            "total_epochs": recipe.total_epochs,
        }
        options.update(kwargs)
        return cls(model, optimizer, recipe.schedule, steps_per_epoch=steps_per_epoch, **options)

    # -- progress ---------------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Optimizer steps taken since the controller was created (or of the resumed run)."""
        return self._steps

    @property
    def epoch(self) -> float:
        """``step_count / steps_per_epoch``: the schedule's clock."""
        return self._steps / self.steps_per_epoch

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
        """One record per mask update: ``{"epoch", "step", "target", "stage", "layers": {name:
        {"target", "achieved", "threshold"}}}``; ``achieved`` counts the zeros in the weights."""
        return list(self._history)

    @property
    def last_update(self) -> dict[str, Any] | None:
        """``{"step", "epoch", "target"}`` of the last mask update, None before the first."""
        return None if self._last_update is None else dict(self._last_update)

    def layer_targets(self, sparsity: float | None = None) -> dict[str, float]:
        """{name: target} for a schedule value (default: the current one)."""
        value = self.sparsity if sparsity is None else sparsity
        final = self.schedule.final_sparsity
        targets = dict.fromkeys(self._names, value)
        for name, layer_final in self._finals.items():
            # At the schedule's final value use the layer's final as given, free of rounding.
            targets[name] = (
                layer_final if value == final else min(layer_final, value * layer_final / final)
            )
        return targets

    # -- the step hook ----------------------------------------------------------------------

    def _after_step(self, _optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        previous = self.epoch
        self._steps += 1
        self._check_accumulation()
        # Re-zero first, also before an update: momentum and weight decay may have moved pruned
        # weights off zero in this step, and they must not outrank kept weights in the new masks.
        self._store.apply()
        if self.schedule.crossed_update(previous, self.epoch):
            self._update()
        if (
            self.fine_tune_weight_decay is not None
            and self._original_decay is None
            and self.stage == "fine_tuning"
        ):
            groups = self._optimizer.param_groups
            self._original_decay = [group["weight_decay"] for group in groups]
            self._set_decay(self.fine_tune_weight_decay)
            logger.info(
                "GMP: fine-tuning from step %d: weight_decay %s -> %g",
                self._steps,
                self._original_decay,
                self.fine_tune_weight_decay,
            )

    def _set_decay(self, value: float) -> None:
        for group in self._optimizer.param_groups:
            group["weight_decay"] = value

    def _update(self) -> None:
        """Fresh masks at the scheduled target, applied; then record and check the result."""
        target = self.sparsity
        targets = self.layer_targets(target)
        names = self._names
        params = self._current_params()
        if self.scope == "layer":
            prune_step(self._model, targets, params=names)
        elif self._caps:
            store = get_store(self._model, create=True)
            store.set_masks(_capped_global(params, target, self._caps))
            store.apply()
        else:
            prune_step(self._model, target, scope="global", params=names)
        store: MaskStore = get_store(self._model)  # type: ignore[assignment]
        if self.mask_optimizer_state:
            store.apply_to(_state_of(self._optimizer), names=names)
        entries = store.entries
        zeros = dict(zip(names, distributed.zero_counts(list(params.values()))))
        record = {
            "epoch": self.epoch,
            "step": self._steps,
            "target": target,
            "stage": self.stage,
            "layers": {
                n: {
                    "target": targets[n],
                    "achieved": zeros[n] / p.numel() if p.numel() else 0.0,
                    "threshold": entries[n].threshold,
                }
                for n, p in params.items()
            },
        }
        self._history.append(record)
        self._last_update = {"step": self._steps, "epoch": self.epoch, "target": target}
        logger.info(
            "GMP update at step %d (epoch %.4g, %s): target %.4f; achieved %s",
            self._steps,
            self.epoch,
            record["stage"],
            target,
            ", ".join(f"{n} {v['achieved']:.4f}" for n, v in record["layers"].items()),
        )
        self._check_counts(params, target, targets, zeros)

    def _check_counts(
        self,
        params: Mapping[str, nn.Parameter],
        target: float,
        targets: Mapping[str, float],
        zeros: Mapping[str, int],
    ) -> None:
        """Warn when the weights' zeros are not ``round(target * numel)``: kept weights that are
        exactly zero (layer scope), or caps leaving too little room (global scope)."""
        if self.scope == "layer":
            off = [
                f"{n} ({zeros[n]} zeros, expected {ops.prune_count(p.numel(), targets[n])})"
                for n, p in params.items()
                if zeros[n] != ops.prune_count(p.numel(), targets[n])
            ]
        else:
            total = sum(p.numel() for p in params.values())
            expected = ops.prune_count(total, target)
            found = sum(zeros.values())
            off = [] if found == expected else [f"all layers ({found} zeros, expected {expected})"]
        if off:
            warnings.warn(
                f"GMP step {self._steps}: achieved sparsity differs from the target for "
                f"{'; '.join(off)}; kept weights are exactly zero or max_sparsity caps bind",
                GMPWarning,
                stacklevel=4,
            )

    def _current_params(self) -> dict[str, nn.Parameter]:
        """The pruned parameters as the model holds them now, looked up by name: loading a
        state_dict with ``assign=True`` or a dtype conversion may have replaced them."""
        inner = unwrap(self._model)[0]
        try:
            return {name: parameter_by_name(inner, name) for name in self._names}
        except KeyError as error:
            raise ValueError(f"GMP: the model no longer has the pruned parameter {error}") from None

    def _check_accumulation(self) -> None:
        """Warn once when the model runs several training forward passes per optimizer step
        (gradient accumulation) that ``gradient_accumulation_steps`` did not announce: then
        ``steps_per_epoch`` is easily given in micro-batches, and the run ends long before its
        schedule does."""
        observed, before = self._forwards, self._forwards_before
        self._forwards, self._forwards_before = 0, observed
        expected = self.gradient_accumulation_steps or 1
        # Two steps in a row with the same count: one odd step (a last partial window) is none.
        if self._accumulation_checked or observed <= 1 or observed == expected:
            return
        if observed != before:
            return
        self._accumulation_checked = True
        spe = self.steps_per_epoch
        end = self.schedule.end_epoch
        stated = (
            ""
            if self.gradient_accumulation_steps is None
            else f" (gradient_accumulation_steps={self.gradient_accumulation_steps})"
        )
        warnings.warn(
            f"GMP: the model runs {observed} training forward passes per optimizer step{stated}, "
            f"and steps_per_epoch={spe} counts optimizer steps. If {spe} is the number of "
            f"batches per epoch (len(loader)), pass steps_per_epoch={math.ceil(spe / observed)}: "
            f"as set, the schedule's end_epoch {end:g} comes only after {end * observed:g} real "
            f"epochs. If {spe} already counts optimizer steps, pass "
            f"gradient_accumulation_steps={observed} to say so.",
            GMPWarning,
            stacklevel=4,
        )

    def check_run_length(self, total_steps: int) -> bool:
        """Whether a run of ``total_steps`` optimizer steps reaches the schedule's ``end_epoch``;
        a GMPWarning saying where it would stop when not. The Lightning and Hugging Face
        callbacks call it with the trainer's planned steps at the start and with the steps
        taken at the end."""
        needed = math.ceil(self.schedule.end_epoch * self.steps_per_epoch)
        if total_steps >= needed:
            return True
        epoch = total_steps / self.steps_per_epoch
        warnings.warn(
            f"GMP: the run takes {total_steps} optimizer steps (schedule epoch {epoch:.4g}), but "
            f"the schedule reaches its final sparsity {self.schedule.final_sparsity:g} at "
            f"end_epoch {self.schedule.end_epoch:g} = step {needed}: it stops at sparsity "
            f"{self.schedule.sparsity_at(epoch):.4g}, in the {self.schedule.stage_at(epoch)} "
            "stage. Check steps_per_epoch (optimizer steps per epoch; with gradient "
            "accumulation, batches / accumulation steps) and the schedule's end_epoch.",
            GMPWarning,
            stacklevel=2,
        )
        return False

    # -- user hooks -------------------------------------------------------------------------

    def epoch_end(self) -> None:
        """Optional: tell the controller an epoch ended, so it can check ``steps_per_epoch``
        against the optimizer steps since the last call (a GMPWarning when they differ)."""
        observed = self._steps - self._epoch_mark
        self._epoch_mark = self._steps
        if observed != self.steps_per_epoch:
            warnings.warn(
                f"GMP: {observed} optimizer steps in this epoch, but steps_per_epoch is "
                f"{self.steps_per_epoch}; the schedule's epochs will drift from the real ones",
                GMPWarning,
                stacklevel=2,
            )

    def plot(self, path: str | os.PathLike[str] | None = None):
        """Per-layer achieved sparsity over the run against the schedule (needs matplotlib);
        returns the matplotlib Figure and saves a PNG to ``path`` if given."""
        from .plotting import plot_sparsity_history

        return plot_sparsity_history(
            self._history,
            path,
            schedule=self.schedule,
            steps_per_epoch=self.steps_per_epoch,
            until_step=self._steps,
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
        if self._store.controller is not None and self._store.controller() is self:
            self._store.controller = None

    # -- checkpoints ------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.state_dict(),
            "steps_per_epoch": self.steps_per_epoch,
            "scope": self.scope,
            "layer_sparsity": dict(self._finals),
            "max_sparsity": dict(self._cap_fractions),
            "fine_tune_weight_decay": self.fine_tune_weight_decay,
            "mask_optimizer_state": self.mask_optimizer_state,
            "mask_gradients": self.mask_gradients,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run bit-identically; tensors and builtins only,
        so it loads with ``torch.load(weights_only=True)``. Save the model's and the
        optimizer's state beside it."""
        store = get_store(self._model)
        if store is not None:
            store.resolve()
        entries = {} if store is None else store.entries
        return {
            "format": _FORMAT,
            "config": self._config(),
            "step": self._steps,
            "stage": self.stage,
            "epoch_mark": self._epoch_mark,
            "last_update": self.last_update,
            "shapes": {n: list(p.shape) for n, p in self._current_params().items()},
            "masks": {
                n: {
                    "mask": export_mask(entries[n]),
                    "target": entries[n].target,
                    "threshold": entries[n].threshold,
                }
                for n in self._names
                if n in entries
            },
            "weight_decay": {"original": copy.copy(self._original_decay)},
            "history": copy.deepcopy(self._history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a saved run. Raises ValueError, with nothing modified, when the state
        belongs to another model (names, shapes) or another configuration (``mask_*`` options
        may differ: they do not change the weights). Load the optimizer's state first: with
        ``mask_optimizer_state`` its pruned entries are zeroed here."""
        keys = ("format", "config", "step", "epoch_mark", "last_update", "shapes", "masks")
        keys += ("weight_decay", "history")
        if (
            not isinstance(state, Mapping)
            or any(k not in state for k in keys)
            or not isinstance(state["config"], Mapping)
        ):
            raise ValueError(f"not a GMP state_dict: expected the keys {list(keys)}")
        if state["format"] != _FORMAT:
            raise ValueError(f"GMP state format {state['format']!r} is not supported")
        config = self._config()
        differ = [k for k in config if k not in _UNCHECKED and state["config"].get(k) != config[k]]
        if differ:
            raise ValueError(
                "the GMP state was saved with a different "
                + "; ".join(f"{k} ({state['config'].get(k)!r}, now {config[k]!r})" for k in differ)
            )
        params = self._current_params()
        shapes = {n: list(p.shape) for n, p in params.items()}
        saved = state["shapes"]
        missing = [n for n in shapes if n not in saved]
        unexpected = [n for n in saved if n not in shapes]
        if missing or unexpected:
            raise ValueError(
                "the GMP state belongs to another model: parameters missing from the state "
                f"{missing}, in the state but not pruned here {unexpected}"
            )
        wrong = [
            f"'{n}' {list(saved[n])} != {shapes[n]}" for n in shapes if list(saved[n]) != shapes[n]
        ]
        if wrong:
            raise ValueError(f"the GMP state belongs to another model: shapes differ for {wrong}")
        strays = [n for n in state["masks"] if n not in shapes]
        if strays:
            raise ValueError(f"GMP state: masks of parameters not pruned here {strays}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"GMP state: step must be an integer >= 0, got {step!r}")
        entries = {
            n: MaskEntry(
                params[n],
                import_mask(params[n], saved_mask["mask"], n),
                float(saved_mask["target"]),
                float(saved_mask["threshold"]),
            )
            for n, saved_mask in state["masks"].items()
        }
        original = state["weight_decay"]["original"]
        if original is not None and len(original) != len(self._optimizer.param_groups):
            raise ValueError(
                f"GMP state: weight decay of {len(original)} param groups saved, the optimizer "
                f"has {len(self._optimizer.param_groups)}"
            )
        epoch_mark = int(state["epoch_mark"])
        last_update = None if state["last_update"] is None else dict(state["last_update"])
        history = copy.deepcopy(list(state["history"]))

        self._steps = step
        self._epoch_mark = epoch_mark
        self._last_update = last_update
        self._history = history
        self._original_decay = None if original is None else list(original)
        if self._original_decay is not None:
            self._set_decay(self.fine_tune_weight_decay)  # type: ignore[arg-type]
        for name in self._names:  # a state saved before the first update holds no masks
            if name not in entries:
                self._store.entries.pop(name, None)
        self._store.set_masks(entries)
        self._store.apply()
        if self.mask_optimizer_state:
            self._store.apply_to(_state_of(self._optimizer), names=list(entries))
