"""GMP recipes: a YAML file (or a parsed mapping) in gmp_ext's flat form or SparseML's
``GMPruningModifier`` form, read into a :class:`Recipe`: a schedule plus the options of
:class:`gmp_ext.GMP` (``GMP.from_recipe``). PyYAML is imported only to read a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gmp_ext.training.schedule import (
    INTERPOLATIONS,
    GMPSchedule,
    LRSteps,
    check_keys,
    check_number,
)

if TYPE_CHECKING:
    import yaml

__all__ = ["Recipe", "load_recipe"]


@dataclass(frozen=True)
class Recipe:
    """Everything a GMP training run reads from a recipe besides the model itself."""

    schedule: GMPSchedule
    params: tuple[str, ...] | None = None
    global_sparsity: bool = False
    lr: LRSteps | None = None
    total_epochs: float | None = None
    fine_tune_weight_decay: float | None = None
    score: str | None = None  # a registered score name (gmp_ext.scores); None: magnitude

    def gmp_options(self) -> dict[str, Any]:
        """The :class:`gmp_ext.GMP` keyword arguments the recipe sets besides the schedule."""
        options: dict[str, Any] = {
            "scope": "global" if self.global_sparsity else "layer",
            "params": None if self.params is None else list(self.params),
            "fine_tune_weight_decay": self.fine_tune_weight_decay,
            "total_epochs": self.total_epochs,
        }
        if self.score is not None:
            options["score"] = self.score
        return options


_SCHEDULE_KEYS = (
    "init_sparsity",
    "final_sparsity",
    "start_epoch",
    "end_epoch",
    "update_frequency",
    "inter_func",
)
_REQUIRED_KEYS = _SCHEDULE_KEYS[:4]
_PRUNING_KEYS = ("params", "global_sparsity", "score")
_RECIPE_KEYS = ("lr", "total_epochs", "num_epochs", "fine_tune_weight_decay")
_MODIFIER = "GMPruningModifier"


def _construct_tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    """Read SparseML's ``!GMPruningModifier {...}`` as ``{"GMPruningModifier": {...}}``."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(
            None, None, f"tag !{suffix} must be applied to a mapping", node.start_mark
        )
    return {suffix: loader.construct_mapping(node, deep=True)}


def _read_yaml(path: Path) -> object:
    try:
        import yaml
    except ImportError as exc:
        raise ImportError("reading YAML recipes needs PyYAML: pip install 'gmp_ext[yaml]'") from exc

    class RecipeLoader(yaml.SafeLoader):
        pass

    RecipeLoader.add_multi_constructor("!", _construct_tagged)
    with path.open(encoding="utf-8") as stream:
        try:
            return yaml.load(stream, Loader=RecipeLoader)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML: {exc}") from exc


def _gmp_modifier(modifiers: object) -> Mapping[str, Any]:
    if not isinstance(modifiers, list):
        raise ValueError(f"modifiers must be a list, got {type(modifiers).__name__}")
    found = []
    for entry in modifiers:
        if not (isinstance(entry, Mapping) and len(entry) == 1):
            raise ValueError(
                f"each modifier must be a tagged mapping like !{_MODIFIER} {{...}}, got {entry!r}"
            )
        ((name, body),) = entry.items()
        if name != _MODIFIER:
            raise ValueError(f"unsupported modifier {name!r}; only {_MODIFIER} is supported")
        if not isinstance(body, Mapping):
            raise ValueError(f"{_MODIFIER} must be a mapping, got {body!r}")
        check_keys(body, _SCHEDULE_KEYS + _PRUNING_KEYS, _MODIFIER)
        found.append(body)
    if len(found) != 1:
        raise ValueError(f"expected exactly one {_MODIFIER}, found {len(found)}")
    return found[0]


def _schedule(data: Mapping[str, Any]) -> GMPSchedule:
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"missing required key(s) {', '.join(missing)}")
    inter_func = data.get("inter_func", "cubic")
    if inter_func not in INTERPOLATIONS:
        raise ValueError(
            f"inter_func must be one of {', '.join(INTERPOLATIONS)}, got {inter_func!r}"
        )
    return GMPSchedule(
        data["init_sparsity"],
        data["final_sparsity"],
        data["start_epoch"],
        data["end_epoch"],
        data.get("update_frequency", 1.0),
        inter_func,
    )


def _params(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise ValueError(f"params must be a string or a non-empty list of strings, got {value!r}")


def _lr_steps(value: object) -> LRSteps | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"lr must be a mapping like {{lr: 0.1, milestones: [30], gamma: 0.1}}, got {value!r}"
        )
    check_keys(value, ("lr", "milestones", "gamma"), "lr")
    if "lr" not in value:
        raise ValueError("lr: missing required key lr")
    return LRSteps(value["lr"], value.get("milestones", ()), value.get("gamma", 0.1))


def _parse_recipe(data: object) -> Recipe:
    if not isinstance(data, Mapping):
        raise ValueError(f"recipe must be a mapping, got {type(data).__name__}")
    if "modifiers" in data:
        check_keys(data, ("modifiers", *_RECIPE_KEYS), "recipe")
        pruning = _gmp_modifier(data["modifiers"])
    else:
        check_keys(data, _SCHEDULE_KEYS + _PRUNING_KEYS + _RECIPE_KEYS, "recipe")
        pruning = data
    schedule = _schedule(pruning)

    if "total_epochs" in data and "num_epochs" in data:
        raise ValueError("give total_epochs or num_epochs, not both")
    total_epochs = data.get("total_epochs", data.get("num_epochs"))
    if total_epochs is not None:
        name = "total_epochs" if "total_epochs" in data else "num_epochs"
        total_epochs = check_number(
            name,
            total_epochs,
            f"a finite number >= end_epoch ({schedule.end_epoch})",
            lambda v: v >= schedule.end_epoch,
        )
    decay = data.get("fine_tune_weight_decay")
    if decay is not None:
        decay = check_number(
            "fine_tune_weight_decay", decay, "a finite number >= 0", lambda v: v >= 0
        )
    global_sparsity = pruning.get("global_sparsity", False)
    if not isinstance(global_sparsity, bool):
        raise ValueError(f"global_sparsity must be true or false, got {global_sparsity!r}")
    score = pruning.get("score")
    if score is not None and not isinstance(score, str):
        raise ValueError(f"score must be a score name such as 'wanda', got {score!r}")
    return Recipe(
        schedule=schedule,
        score=score,
        params=_params(pruning.get("params")),
        global_sparsity=global_sparsity,
        lr=_lr_steps(data.get("lr")),
        total_epochs=total_epochs,
        fine_tune_weight_decay=decay,
    )


def load_recipe(source: str | os.PathLike[str] | Mapping[str, Any]) -> Recipe:
    """Read a GMP recipe from a YAML file or an already-parsed mapping.

    Field names follow SparseML's ``GMPruningModifier`` (``init_sparsity``, ``final_sparsity``,
    ``start_epoch``, ``end_epoch``, ``update_frequency``, ``inter_func``, ``params``,
    ``global_sparsity``), either at the top level or inside a ``modifiers:`` list holding one
    ``!GMPruningModifier`` entry. Recipe-level keys: ``lr`` (``{lr, milestones, gamma}``),
    ``total_epochs`` (alias ``num_epochs``) and ``fine_tune_weight_decay``; beside the schedule,
    ``score`` (a registered score name, :mod:`gmp_ext.scores`). Unknown keys are errors rather
    than ignored, since a misspelt key would otherwise silently change a run.
    """
    if not isinstance(source, (str, os.PathLike)):
        return _parse_recipe(source)  # a mapping, or a ValueError naming what it got
    path = Path(source)
    data = _read_yaml(path)
    try:
        return _parse_recipe(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
