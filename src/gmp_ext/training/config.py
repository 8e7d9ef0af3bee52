"""The GMP controller's options, validated once: what a run is, and what its checkpoint records."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gmp_ext.kernels import ops
from gmp_ext.model.parameters import check_patterns, matches
from gmp_ext.pruning.strategies import (
    GlobalSelection,
    LayerSelection,
    NMSelection,
    Selection,
    check_nm,
)
from gmp_ext.scores import Magnitude, Score, ScoreSpec, score_for
from gmp_ext.training.schedule import Schedule

__all__ = ["GMPConfig", "check_in_optimizer", "per_layer"]

# Options recorded in a checkpoint but not checked on resume: they never change the weights (nor
# the masks), only the optimizer state and gradients of pruned weights, or what is warned about.
UNCHECKED = ("mask_optimizer_state", "mask_gradients", "gradient_accumulation_steps")


def _positive_int(value: object, name: str, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 ({meaning}), got {value!r}")
    return int(value)


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def per_layer(
    spec: Mapping[str, float] | None, names: Sequence[str], what: str
) -> dict[str, float]:
    """{name: value} for the selected names a spec entry matches: an exact name wins, otherwise
    the first matching pattern (:func:`gmp_ext.model.parameters.matches`). An entry matching nothing
    is an error: a typo would otherwise silently change the run."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise TypeError(f"{what} must be a mapping {{name or pattern: sparsity}}, got {spec!r}")
    values = {key: ops.check_sparsity(v, f"{what}[{key!r}]") for key, v in spec.items()}
    check_patterns(values, names, f"{what} entries")
    result = {}
    for name in names:
        key = name if name in values else next((k for k in values if matches(k, name)), None)
        if key is not None:
            result[name] = values[key]
    return result


def check_in_optimizer(
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


@dataclass(frozen=True)
class GMPConfig:
    """A GMP run's options after validation; ``layer_sparsity`` and ``max_sparsity`` are
    resolved to the selected parameter names.

    ``steps_per_epoch`` converts the optimizer's step count into the schedule's epochs (see
    :mod:`gmp_ext.training.controller` for the exact timing). A schedule with a ``steps_per_epoch``
    of its own (:class:`gmp_ext.training.lr_schedule.RunSchedule`, built with a learning-rate factor
    for
    that value) must get the same one: another is a ValueError naming both. ``scope="layer"`` prunes
    every selected parameter to the target; ``scope="global"`` prunes ``round(target * total)``
    of all of them with one threshold.

    ``layer_sparsity`` ({name or pattern: final sparsity}, layer scope) gives some layers their
    own final target: such a layer follows the schedule's curve scaled by
    ``layer_final / schedule.final_sparsity`` (its initial sparsity scaled alike), reaching its
    own final exactly at ``end_epoch``. ``max_sparsity`` ({name or pattern: cap}, global scope)
    keeps a layer from pruning more than ``round(cap * numel)`` elements; the budget it cannot
    take goes to the other layers. Keys follow :func:`gmp_ext.model.parameters.matches` and each
    must match a selected parameter; an exact name wins over patterns, otherwise the first match.

    ``nm=(n, m)`` prunes N:M (:class:`gmp_ext.pruning.strategies.NMSelection`): the schedule ramps
    the sparsity as usual but only within groups of ``m`` consecutive weights of each row, and
    a final sparsity of ``1 - n/m`` ends exactly n:m sparse (e.g. 0.5 for ``(2, 4)``). A
    schedule or ``layer_sparsity`` ending above ``1 - n/m`` is a ValueError; ``max_sparsity``
    does not combine with it. ``selection`` gives the strategy itself (a
    :class:`gmp_ext.pruning.strategies.Selection`) instead of ``scope``/``nm``; checkpoints record
    it by name and parameters.

    ``score`` chooses what each update ranks (:mod:`gmp_ext.scores`): ``"magnitude"`` (|w|,
    the default), ``"wanda"`` (|w| times the norms of the inputs the layers saw since the last
    update), ``"movement"`` (``-w * grad`` summed over the optimizer steps since the last
    update), a Score or a function ``f(name, param) -> values``. What the score observed is
    part of the controller's state_dict.

    ``fine_tune_weight_decay`` replaces every param group's weight decay once fine-tuning
    starts; ``total_epochs`` (if given) must leave the schedule room to finish.

    ``gradient_accumulation_steps`` states how many training forward passes of the model make
    one optimizer step. GMP counts them (a forward pre-hook, and a backward hook on one trained
    parameter that also counts under torch.compile) and warns once, naming the
    ``steps_per_epoch`` that fits, when it sees more than stated: with gradient accumulation,
    ``steps_per_epoch=len(loader)`` counts micro-batches and the run ends long before the
    schedule does.

    ``mask_optimizer_state`` (default on) zeroes, at every mask update and when a checkpoint
    restores masks, the optimizer state of the pruned weights (see
    :func:`gmp_ext.zero_pruned_state`), so no stale momentum or second moment survives pruning.
    ``mask_gradients`` zeroes the pruned weights' ``.grad`` entries before every optimizer
    step, so that state stays zero between updates and pruned weights never move. Neither
    changes the kept weights: a run is bit-identical with or without them.
    """

    schedule: Schedule
    steps_per_epoch: int
    scope: str = "layer"
    layer_sparsity: Mapping[str, float] = field(default_factory=dict)
    max_sparsity: Mapping[str, float] = field(default_factory=dict)
    fine_tune_weight_decay: float | None = None
    total_epochs: float | None = None
    mask_optimizer_state: bool = True
    mask_gradients: bool = False
    gradient_accumulation_steps: int | None = None
    nm: tuple[int, int] | None = None
    score: Score = field(default_factory=Magnitude)
    strategy: Selection | None = None  # a strategy given as selection=, else from scope/nm

    @classmethod
    def create(
        cls,
        schedule: object,
        optimizer: torch.optim.Optimizer,
        names: Sequence[str],
        *,
        steps_per_epoch: object,
        scope: object = "layer",
        layer_sparsity: Mapping[str, float] | None = None,
        max_sparsity: Mapping[str, float] | None = None,
        fine_tune_weight_decay: object = None,
        total_epochs: object = None,
        mask_optimizer_state: object = True,
        mask_gradients: object = False,
        gradient_accumulation_steps: object = None,
        nm: object = None,
        score: ScoreSpec = None,
        selection: object = None,
    ) -> GMPConfig:
        """Validate the options against the schedule, the optimizer and the selected parameter
        ``names``: TypeError / ValueError naming the option and the value otherwise."""
        if not isinstance(schedule, Schedule):
            raise TypeError(
                "schedule must be a gmp_ext.GMPSchedule (or an object with its methods "
                f"sparsity_at, stage_at, crossed_update, state_dict), got {type(schedule).__name__}"
            )
        spe = _positive_int(
            steps_per_epoch,
            "steps_per_epoch",
            "optimizer steps per epoch; 1 to give the schedule in steps",
        )
        # A schedule built with a learning-rate factor for one steps_per_epoch (a RunSchedule of
        # gmp_ext.training.lr_schedule) says so: with another, the cuts miss the factor's restarts.
        built_for = getattr(schedule, "steps_per_epoch", None)
        if built_for is not None and built_for != spe:
            raise ValueError(
                f"steps_per_epoch must be the schedule's own, {built_for} (the learning-rate "
                f"factor built with it restarts on that clock), got {spe}: pass "
                f"steps_per_epoch={built_for}, or build the schedule for {spe}"
            )
        strategy = None
        if selection is not None:
            if not isinstance(selection, Selection):
                raise TypeError(
                    "selection must be a gmp_ext.pruning.strategies.Selection (LayerSelection, "
                    f"GlobalSelection, NMSelection, ...), got {type(selection).__name__}"
                )
            if scope != "layer" or nm is not None:
                raise ValueError("give selection= or scope=/nm=, not both")
            strategy, scope = selection, selection.scope
            nm = selection.nm if isinstance(selection, NMSelection) else None
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        if layer_sparsity is not None and scope != "layer":
            raise ValueError("layer_sparsity needs scope='layer' (use max_sparsity for global)")
        if max_sparsity is not None and scope != "global":
            raise ValueError("max_sparsity needs scope='global' (use layer_sparsity for layer)")
        if layer_sparsity and schedule.final_sparsity == 0:
            raise ValueError("layer_sparsity scales the schedule: it needs final_sparsity > 0")
        decay = None
        if fine_tune_weight_decay is not None:
            decay = cls._check_decay(optimizer, fine_tune_weight_decay)
        if total_epochs is not None and not (
            isinstance(total_epochs, numbers.Real)
            and not isinstance(total_epochs, bool)
            and schedule.end_epoch <= float(total_epochs) < math.inf
        ):
            raise ValueError(
                f"total_epochs must be a finite number >= the schedule's end_epoch "
                f"({schedule.end_epoch}), got {total_epochs!r}"
            )
        accumulation = None
        if gradient_accumulation_steps is not None:
            accumulation = _positive_int(
                gradient_accumulation_steps,
                "gradient_accumulation_steps",
                "training forward passes per optimizer step",
            )
        pattern = None if nm is None else check_nm(nm)
        layer_targets = per_layer(layer_sparsity, names, "layer_sparsity")
        if pattern is not None:
            cls._check_nm(pattern, schedule, layer_targets, max_sparsity)
        return cls(
            schedule=schedule,
            steps_per_epoch=spe,
            scope=str(scope),
            layer_sparsity=layer_targets,
            max_sparsity=per_layer(max_sparsity, names, "max_sparsity"),
            fine_tune_weight_decay=decay,
            total_epochs=None if total_epochs is None else float(total_epochs),
            mask_optimizer_state=_flag(mask_optimizer_state, "mask_optimizer_state"),
            mask_gradients=_flag(mask_gradients, "mask_gradients"),
            gradient_accumulation_steps=accumulation,
            nm=pattern,
            score=score_for(score),
            strategy=strategy,
        )

    @staticmethod
    def _check_nm(
        pattern: tuple[int, int],
        schedule: Schedule,
        layer_targets: Mapping[str, float],
        max_sparsity: Mapping[str, float] | None,
    ) -> None:
        n, m = pattern
        limit = 1 - n / m
        if max_sparsity is not None:
            raise ValueError("max_sparsity does not combine with nm= (N:M caps every group)")
        if schedule.final_sparsity > limit:
            raise ValueError(
                f"the schedule ends at final_sparsity {schedule.final_sparsity!r}, above "
                f"1 - n/m = {limit} of nm=({n}, {m}), which prunes at most {m - n} of every {m}"
            )
        over = {k: v for k, v in layer_targets.items() if v > limit}
        if over:
            raise ValueError(f"layer_sparsity above 1 - n/m = {limit} of nm=({n}, {m}): {over}")

    def selection(self, numels: Mapping[str, int]) -> Selection:
        """The strategy of this run, given the selected parameters' sizes (for the caps of
        ``max_sparsity``)."""
        if self.strategy is not None:
            return self.strategy
        if self.nm is not None:
            return NMSelection(*self.nm, scope=self.scope)
        if self.scope == "global":
            caps = {n: ops.prune_count(numels[n], c) for n, c in self.max_sparsity.items()}
            return GlobalSelection(caps)
        return LayerSelection()

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

    def to_dict(self) -> dict[str, Any]:
        """Builtins only (the schedule as its ``state_dict``), as checkpoints record it."""
        return {
            "schedule": self.schedule.state_dict(),
            "steps_per_epoch": self.steps_per_epoch,
            "scope": self.scope,
            "layer_sparsity": dict(self.layer_sparsity),
            "max_sparsity": dict(self.max_sparsity),
            "fine_tune_weight_decay": self.fine_tune_weight_decay,
            "mask_optimizer_state": self.mask_optimizer_state,
            "mask_gradients": self.mask_gradients,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "nm": None if self.nm is None else list(self.nm),
            "score": self.score.to_dict(),
            "selection": None if self.strategy is None else self.strategy.to_dict(),
        }

    def layer_targets(self, names: Sequence[str], value: float) -> dict[str, float]:
        """{name: target} of the pruned parameters ``names`` at the schedule value ``value``:
        a layer with its own final target follows the schedule scaled to it."""
        final = self.schedule.final_sparsity
        targets = dict.fromkeys(names, value)
        for name, layer_final in self.layer_sparsity.items():
            # At the schedule's final value use the layer's final as given, free of rounding.
            targets[name] = (
                layer_final if value == final else min(layer_final, value * layer_final / final)
            )
        return targets

    def differences(self, saved: Mapping[str, Any]) -> list[str]:
        """The options that change the weights and differ from a saved ``to_dict()``."""
        mine = self.to_dict()
        saved = {"score": Magnitude().to_dict(), **saved}  # states from before scores
        return [
            f"{k} ({saved.get(k)!r}, now {mine[k]!r})"
            for k in mine
            if k not in UNCHECKED and saved.get(k) != mine[k]
        ]
