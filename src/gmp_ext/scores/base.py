"""The score seam: what a prune step ranks, apart from what it zeroes.

A :class:`Score` gives each selected parameter a tensor of values (float32, the parameter's
shape); the selection prunes the elements with the smallest values, by the same exact count and
tie rule as magnitude (value, then index), and zeroes those elements of the *weights*. The
default, :class:`gmp_ext.scores.Magnitude`, gives no tensor: the kernels rank |w| in place (no
extra memory, the fused two-read prune). A *scaled* score (``scaled = True``: Wanda) gives
per-feature factors of |w| instead (:meth:`Score.factors`, a vector per tensor): the kernels
multiply as they read the weights, so it needs no weight-sized buffer and keeps the fused
prune. Every other score is one file on this seam: a subclass with ``name`` and
:meth:`Score.values` (or ``scaled`` and :meth:`Score.factors`), plus :meth:`Score.attach` when
it observes training (hooks), and ``state_dict``/``load_state_dict`` when it keeps state
across updates.

The kernels rank non-negative keys (the bit pattern of |x|). Signed values are mapped onto
them exactly by :func:`rank_tensors`, which knows the counts: a selection that prunes at least
every negative value ranks ``0`` for negatives and the next float up for the rest; one that
prunes fewer ranks the negatives by mirrored bit patterns (the most negative first) above none
of the rest. Both maps are integer arithmetic on the bit patterns, so the order, ties included,
is exactly the values' (one exception: ``+inf`` ranks equal to the largest finite value).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Union

import torch
from torch import nn

from gmp_ext.kernels.layout import KeyScale

__all__ = [
    "KeyScale",
    "Ranked",
    "Scaled",
    "Score",
    "ScoreSpec",
    "rank_tensors",
    "register_score",
    "registered_scores",
    "score_from_dict",
]

_INF_BITS = 0x7F800000
_SCORES: dict[str, type[Score]] = {}


class Score:
    """What a selection ranks. Subclasses set ``name`` (registered by :func:`register_score`)
    and implement :meth:`values` (of any sign)."""

    name: ClassVar[str] = ""
    in_place: ClassVar[bool] = False  # ranks |w| itself (values() is None): magnitude
    scaled: ClassVar[bool] = False  # ranks |w| times per-feature factors (factors())

    def values(
        self, names: Sequence[str], params: Sequence[torch.Tensor]
    ) -> list[torch.Tensor] | None:
        """Float32 values of the parameters' shapes (detached, on their devices), the smallest
        pruned first; None ranks |w| itself. Raises ValueError naming the parameter when the
        score has nothing to rank it by (no activations seen, no gradients). A scaled score's
        are its factors applied (what the kernels rank without making them)."""
        if self.scaled:
            factors = self.factors(names, params)
            return [scale.weighted(param) for scale, param in zip(factors, params)]
        raise NotImplementedError

    def factors(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> list[KeyScale]:
        """A scaled score's factors: per parameter, float32 ``>= 0`` along one dimension
        (:class:`gmp_ext.kernels.layout.KeyScale`); the value of a weight is |w| times its
        factor. Raises ValueError naming the parameter as :meth:`values` does."""
        raise NotImplementedError

    def attach(
        self, model: nn.Module, names: Sequence[str], optimizer: torch.optim.Optimizer | None = None
    ) -> list[Any]:
        """Start observing ``model``'s parameters ``names`` (hooks); returns removable handles.
        A score that observes nothing returns none."""
        return []

    def reset(self) -> None:
        """Start a new observation window (after the masks were updated from this one)."""

    def params(self) -> dict[str, Any]:
        """Constructor arguments, builtins only: ``type(self)(**params())`` is an equal score."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the score observed so far (tensors and builtins), for checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output."""

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **params()}``: what :func:`score_from_dict` makes this score from."""
        return {"name": self.name, **self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


# What ``score=`` takes: a registered name, a Score, or f(name, param) -> values.
ScoreSpec = Union[str, Score, Callable[[str, torch.Tensor], torch.Tensor], None]


def register_score(cls: type[Score]) -> type[Score]:
    """Class decorator: make ``score=cls.name`` (and checkpoints naming it) find ``cls``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute 'name' to be registered")
    _SCORES[cls.name] = cls
    return cls


def registered_scores() -> dict[str, type[Score]]:
    """{name: class} of every registered score."""
    return dict(_SCORES)


def score_from_dict(spec: Mapping[str, Any]) -> Score:
    """The score a :meth:`Score.to_dict` describes (ValueError for an unknown name)."""
    params = dict(spec)
    name = params.pop("name", None)
    if name not in _SCORES:
        raise ValueError(f"unknown score {name!r}; registered: {sorted(_SCORES)}")
    return _SCORES[name](**params)


def _check_values(
    score: Score, names: Sequence[str], params: Sequence[torch.Tensor], values: Sequence[object]
) -> tuple[list[torch.Tensor], list[bool]]:
    """The values as contiguous float32 on each parameter's device, and whether each holds a
    negative value; ValueError naming the parameter on a wrong shape or dtype, or NaN."""
    checked = []
    for name, param, value in zip(names, params, values):
        if not isinstance(value, torch.Tensor) or value.shape != param.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"score {score.name!r} must give a tensor of shape {tuple(param.shape)} for "
                f"parameter '{name}', got {got}"
            )
        if not value.is_floating_point():
            raise ValueError(
                f"score {score.name!r} gave parameter '{name}' values of dtype {value.dtype}; "
                "scores are floating point"
            )
        checked.append(value.detach().to(device=param.device, dtype=torch.float32).contiguous())
    # One read per tensor answers both questions: a minimum is NaN when any value is.
    lows = [float(v.min()) if v.numel() else 0.0 for v in checked]
    for name, value, low in zip(names, checked, lows):
        if math.isnan(low):
            raise ValueError(
                f"parameter '{name}': its {score.name!r} score has "
                f"{int(torch.isnan(value).sum())} NaN value(s) (NaN weights, activations or "
                "gradients); they cannot be ranked (nothing was modified)"
            )
    return checked, [low < 0 for low in lows]


class Scaled(NamedTuple):
    """A scaled score's factors for one selection (checked): the kernels rank |w| times them."""

    scales: list[KeyScale]
    score: str  # the score's name, for errors

    def weighted(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The values themselves (float32 tensors), for paths that rank tensors."""
        return [scale.weighted(p) for scale, p in zip(self.scales, params)]

    def raise_on_nan(self, values: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
        """ValueError naming the first of ``values`` (the products) holding NaN: a NaN weight,
        or an infinite one against a zero factor."""
        for value, label in zip(values, labels):
            count = int(torch.isnan(value).sum())
            if count:
                raise ValueError(
                    f"{label}: its {self.score!r} score has {count} NaN value(s) (a NaN weight, "
                    "or an infinite weight against a zero factor); they cannot be ranked "
                    "(nothing was modified)"
                )


def _check_factors(
    score: Score, names: Sequence[str], params: Sequence[torch.Tensor], scales: Sequence[object]
) -> list[KeyScale]:
    """The factors, contiguous float32 on each parameter's device; ValueError naming the
    parameter on a wrong dimension or length, or a NaN, infinite or negative factor."""
    if len(scales) != len(params):
        raise ValueError(
            f"score {score.name!r} gave {len(scales)} factor sets for {len(params)} parameters"
        )
    checked = []
    for name, param, scale in zip(names, params, scales):
        if (
            not isinstance(scale, KeyScale)
            or not isinstance(scale.factors, torch.Tensor)
            or not isinstance(scale.dim, int)
            or not -param.dim() <= scale.dim < param.dim()
        ):
            raise ValueError(
                f"score {score.name!r} must give parameter '{name}' (shape {tuple(param.shape)}) "
                f"a KeyScale along one of its dimensions, got {scale!r}"
            )
        dim = scale.dim % param.dim()
        factors = scale.factors.detach().to(device=param.device, dtype=torch.float32)
        if factors.shape != (param.shape[dim],):
            raise ValueError(
                f"score {score.name!r} gave parameter '{name}' factors of shape "
                f"{tuple(factors.shape)} for its dimension {dim} of size {param.shape[dim]}"
            )
        checked.append(KeyScale(factors.contiguous(), dim))
    # The extremes answer all three questions; an infinite factor would make a zero weight's
    # value NaN (input norms overflow float32 above about 1.8e19 per feature).
    extremes = [s.factors.aminmax() if s.factors.numel() else None for s in checked]
    for name, extreme in zip(names, extremes):
        if extreme is None:
            continue
        low, high = float(extreme.min), float(extreme.max)
        if math.isnan(low) or low < 0 or math.isinf(high):
            kind = "NaN" if math.isnan(low) else "negative" if low < 0 else "infinite"
            raise ValueError(
                f"parameter '{name}': its {score.name!r} factors hold {kind} values (from "
                f"{low} to {high}); they cannot scale |w| (nothing was modified)"
            )
    return checked


class Ranked(NamedTuple):
    """A score's tensors for one selection: ``ranked`` (what the kernels rank), ``values``
    (the score's own) and, where signed values were mapped, ``shifted`` (per tensor, which of
    the two maps: True when the count reaches every negative value, which then all rank at key
    0); None when the values are ranked as they are (``ranked is values``)."""

    ranked: list[torch.Tensor]
    values: list[torch.Tensor]
    shifted: list[bool] | None

    @property
    def mapped(self) -> bool:
        return self.shifted is not None

    def cuts(self, rows: Sequence[torch.Tensor], per_tensor: bool) -> list[float]:
        """The value at the cut (the largest pruned value) per tensor, from selection rows over
        the mapped values: the value at the row's index, except where the shifted map ranked
        every negative at key 0 (then the largest negative: of the tensor, or of all tensors in
        a global selection); 0.0 where nothing is pruned. A global selection has one cut, the
        last pruned element in (tensor, index) order: every tensor reports it."""
        shifted = self.shifted or [False] * len(self.values)
        cuts: list[float | None] = []
        for value, row, among_negatives in zip(self.values, rows, shifted):
            key, index = int(row[0]), int(row[1])
            if index < 0:
                cuts.append(None)
                continue
            cut = float(value.reshape(-1)[index])
            if among_negatives and key == 0:
                pool = [value] if per_tensor else self.values
                cut = float(torch.cat([v[v < 0] for v in pool]).max())
            cuts.append(cut)
        if per_tensor:
            return [0.0 if c is None else c for c in cuts]
        found = [c for c in cuts if c is not None]
        return [found[-1] if found else 0.0] * len(cuts)


def rank_tensors(
    score: Score,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    counts: Sequence[int],
    per_tensor: bool,
) -> Ranked | Scaled | None:
    """The score's values and, for the kernels, non-negative float32 tensors whose |x| order is
    exactly the values' order for the given counts (one per tensor with ``per_tensor``, else one
    for all); a scaled score's checked factors; None when the score ranks |w| itself.
    ValueError naming the parameter on NaN values, before anything is modified. Non-negative
    values are ranked as they are."""
    if score.scaled:
        factors = score.factors(names, params)
        return Scaled(_check_factors(score, names, params, factors), score.name)
    raw = score.values(names, params)
    if raw is None:
        return None
    values, signed = _check_values(score, names, params, raw)
    if not any(signed):
        return Ranked(values, values, None)
    negatives = [int((v < 0).sum()) if neg else 0 for v, neg in zip(values, signed)]
    if per_tensor:
        shifted = [k >= c for k, c in zip(counts, negatives)]
    else:
        shifted = [sum(counts) >= sum(negatives)] * len(values)
    ranked = [_shifted(v) if every else _mirrored(v) for v, every in zip(values, shifted)]
    return Ranked(ranked, values, shifted)


def _shifted(values: torch.Tensor) -> torch.Tensor:
    """Negatives -> 0 (all pruned first, by index); v >= 0 -> the float one step above |v|."""
    bits = values.abs().view(torch.int32)
    keys = torch.where(values < 0, 0, torch.clamp(bits + 1, max=_INF_BITS))
    return keys.view(torch.float32)


def _mirrored(values: torch.Tensor) -> torch.Tensor:
    """Negatives -> mirrored bit patterns (the most negative smallest); v >= 0 -> +inf, which
    a selection of fewer than all negatives never reaches."""
    bits = values.abs().view(torch.int32)
    keys = torch.where(values < 0, _INF_BITS - bits, _INF_BITS)
    return keys.view(torch.float32)
