"""Gradual magnitude pruning schedules, free of torch so they can be checked anywhere
(recipes, which read them from YAML: :mod:`gmp_ext.training.recipes`).

A schedule is a pure function of the (fractional) epoch: the pruning controller converts its
optimizer step count into epochs and asks when to update and to which target sparsity.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    pass

__all__ = [
    "INTERPOLATIONS",
    "GMPSchedule",
    "LRSteps",
    "Schedule",
    "Stage",
    "check_keys",
    "check_number",
]

Stage = Literal["stabilization", "pruning", "fine_tuning"]
Interpolation = Callable[[float], float]


@runtime_checkable
class Schedule(Protocol):
    """What :class:`gmp_ext.GMP` reads of a schedule: :class:`GMPSchedule` is one; any object
    with these members can drive the controller (epochs are optimizer steps divided by
    ``steps_per_epoch``)."""

    @property
    def final_sparsity(self) -> float: ...

    @property
    def end_epoch(self) -> float: ...

    def sparsity_at(self, epoch: float) -> float: ...

    def stage_at(self, epoch: float) -> Stage: ...

    def crossed_update(self, previous: float, current: float) -> bool:
        """Whether an update point t with ``previous < t <= current`` exists."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Builtins that identify the schedule (a checkpoint compares them on resume)."""
        ...


# Tolerance, in units of update intervals and relative to the magnitudes involved, so that an
# epoch computed as step / steps_per_epoch still reaches an update point computed as
# start + i * frequency when both differ only by rounding.
_EPS = 1e-9


def _linear(x: float) -> float:
    return x


def _cubic(x: float) -> float:
    return 1.0 - (1.0 - x) ** 3


def _inverse_cubic(x: float) -> float:
    return 1.0 - (1.0 - x) ** (1.0 / 3.0)


_BUILTIN: dict[str, Interpolation | None] = {
    "linear": _linear,
    "cubic": _cubic,
    "inverse_cubic": _inverse_cubic,
    "exponential": None,  # depends on init/final, built in GMPSchedule.__post_init__
}
INTERPOLATIONS: tuple[str, ...] = tuple(_BUILTIN)
_STATE_KEYS = (
    "init_sparsity",
    "final_sparsity",
    "start_epoch",
    "end_epoch",
    "update_frequency",
    "interpolation",
)


def check_number(name: str, value: object, requirement: str, ok: Callable[[float], bool]) -> float:
    """Coerce a user-supplied real number; bool is rejected because True == 1 hides typos."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and ok(number):
            return number
    raise ValueError(f"{name} must be {requirement}, got {value!r}")


def check_keys(mapping: Mapping[Any, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [key for key in mapping if key not in allowed]
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}"
        )


def _as_epoch(value: object) -> float:
    """Infinite epochs are allowed: -inf is the natural "before training" for crossed_update."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value):
        return float(value)
    raise ValueError(f"epoch must be a real number (not NaN), got {value!r}")


def _exponential(init: float, final: float) -> Interpolation:
    """Density 1 - s decays geometrically; written as init + (final - init) * f(x) so f(0) = 0
    and f(1) = 1 exactly and all interpolations share one code path."""
    ratio = (1.0 - final) / (1.0 - init)
    if ratio == 1.0:
        return _linear  # init == final: the sparsity is constant whatever f is
    return lambda x: (1.0 - ratio**x) / (1.0 - ratio)


def _check_callable(f: Interpolation) -> None:
    """Sample the user's f: a non-monotone or unnormalised f would make sparsity go backwards."""
    values: list[float] = []
    for i in range(101):
        x = i / 100
        y = f(x)
        if not isinstance(y, numbers.Real) or isinstance(y, bool) or not math.isfinite(y):
            raise ValueError(
                f"interpolation callable must return finite real numbers, got {y!r} at x={x}"
            )
        values.append(float(y))
    if abs(values[0]) > 1e-9 or abs(values[-1] - 1.0) > 1e-9:
        raise ValueError(
            f"interpolation callable must satisfy f(0) == 0 and f(1) == 1, "
            f"got f(0)={values[0]!r}, f(1)={values[-1]!r}"
        )
    for i in range(100):
        if values[i + 1] < values[i] - 1e-12:
            raise ValueError(
                f"interpolation callable must be non-decreasing on [0, 1], but "
                f"f({(i + 1) / 100})={values[i + 1]!r} < f({i / 100})={values[i]!r}"
            )


def _qualified_name(f: Callable[..., Any]) -> str:
    module = getattr(f, "__module__", None) or type(f).__module__
    qualname = getattr(f, "__qualname__", None) or type(f).__qualname__
    return f"{module}.{qualname}"


@dataclass(frozen=True)
class GMPSchedule:
    """Target sparsity over epochs for gradual magnitude pruning (Zhu & Gupta, 2017).

    Sparsity is 0 before ``start_epoch``, then piecewise constant: at update points
    ``start_epoch + i * update_frequency`` (plus a last one forced at ``end_epoch``) it jumps to
    ``init + (final - init) * f(x)`` with ``x`` the fraction of the pruning span elapsed, and it
    stays ``final_sparsity`` from ``end_epoch`` on. ``interpolation`` is one of
    :data:`INTERPOLATIONS` or a non-decreasing callable with ``f(0) == 0`` and ``f(1) == 1``.
    An epoch within 1e-9 update intervals (relative) of an update point counts as reaching it,
    so ``step / steps_per_epoch`` hits points like ``0.1 * 3`` despite rounding.
    """

    init_sparsity: float
    final_sparsity: float
    start_epoch: float
    end_epoch: float
    update_frequency: float = 1.0
    interpolation: str | Interpolation = "cubic"
    _f: Interpolation = field(init=False, repr=False, compare=False)
    _span: float = field(init=False, repr=False, compare=False)  # (end - start) / frequency
    _regular: int = field(init=False, repr=False, compare=False)  # update points before end

    def __post_init__(self) -> None:
        unit = "a finite number in [0, 1]"
        init = check_number("init_sparsity", self.init_sparsity, unit, lambda v: 0.0 <= v <= 1.0)
        final = check_number("final_sparsity", self.final_sparsity, unit, lambda v: 0.0 <= v <= 1.0)
        if final < init:
            raise ValueError(f"final_sparsity must be >= init_sparsity ({init}), got {final}")
        start = check_number(
            "start_epoch", self.start_epoch, "a finite number >= 0", lambda v: v >= 0
        )
        end = check_number(
            "end_epoch",
            self.end_epoch,
            f"a finite number > start_epoch ({start})",
            lambda v: v > start,
        )
        freq = check_number(
            "update_frequency", self.update_frequency, "a finite number > 0", lambda v: v > 0
        )
        interpolation = self.interpolation
        if isinstance(interpolation, str):
            if interpolation not in _BUILTIN:
                raise ValueError(
                    f"interpolation must be a callable or one of {', '.join(INTERPOLATIONS)}, "
                    f"got {interpolation!r}"
                )
            if interpolation == "exponential":
                if final >= 1.0:
                    raise ValueError(
                        f"final_sparsity must be < 1 for interpolation 'exponential', got {final}"
                    )
                f = _exponential(init, final)
            else:
                builtin = _BUILTIN[interpolation]
                assert builtin is not None  # only "exponential" has none, made above
                f = builtin
        elif callable(interpolation):
            _check_callable(interpolation)
            f = interpolation
        else:
            raise ValueError(
                f"interpolation must be a callable or one of {', '.join(INTERPOLATIONS)}, "
                f"got {interpolation!r}"
            )
        span = (end - start) / freq
        values = {
            "init_sparsity": init,
            "final_sparsity": final,
            "start_epoch": start,
            "end_epoch": end,
            "update_frequency": freq,
            "_f": f,
            "_span": span,
            "_regular": max(1, math.ceil(span - _EPS * max(1.0, span))),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    # -- evaluation ---------------------------------------------------------------------------

    def _index(self, epoch: float) -> int:
        """Index of the last update point reached at ``epoch``: -1 before the first one,
        ``self._regular`` (the forced one at ``end_epoch``) from ``end_epoch`` on."""
        epoch = _as_epoch(epoch)
        if math.isinf(epoch):
            return -1 if epoch < 0 else self._regular
        u = (epoch - self.start_epoch) / self.update_frequency
        u += _EPS * max(1.0, (abs(epoch) + self.start_epoch) / self.update_frequency)
        if u < 0:
            return -1
        if u >= self._span:
            return self._regular
        return min(math.floor(u), self._regular - 1)

    def _point(self, index: int) -> float:
        if index == self._regular:
            return self.end_epoch
        return self.start_epoch + index * self.update_frequency

    def _value(self, index: int) -> float:
        if index < 0:
            return 0.0
        if index == self._regular:
            return self.final_sparsity
        x = (self._point(index) - self.start_epoch) / (self.end_epoch - self.start_epoch)
        x = min(max(x, 0.0), 1.0)
        value = self.init_sparsity + (self.final_sparsity - self.init_sparsity) * self._f(x)
        # Guard against rounding (and callables only sampled at 101 points) leaving the range.
        return min(max(value, self.init_sparsity), self.final_sparsity)

    def sparsity_at(self, epoch: float) -> float:
        """Target sparsity in effect at ``epoch`` (that of the last update point reached)."""
        return self._value(self._index(epoch))

    def stage_at(self, epoch: float) -> Stage:
        """Training stage, so callers can e.g. switch weight decay once pruning has finished."""
        index = self._index(epoch)
        if index < 0:
            return "stabilization"
        return "fine_tuning" if index == self._regular else "pruning"

    def update_points(self) -> list[float]:
        """Epochs at which the target sparsity changes, from ``start_epoch`` to ``end_epoch``."""
        return [self._point(i) for i in range(self._regular + 1)]

    def next_update(self, epoch: float) -> float | None:
        """First update point after ``epoch``, or None once ``end_epoch`` has been reached."""
        index = self._index(epoch) + 1
        return self._point(index) if index <= self._regular else None

    def crossed_update(self, prev_epoch: float, epoch: float) -> bool:
        """Whether an update point t with ``prev_epoch < t <= epoch`` exists.

        A controller calls this once per optimizer step with the epochs before and after the
        step; pass ``prev_epoch=-math.inf`` on the first call so an update at epoch 0 counts.
        """
        return self._index(epoch) > self._index(prev_epoch)

    # -- (de)serialisation --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain builtins only, so the state survives ``torch.load(weights_only=True)``.

        A callable interpolation is stored by qualified name only; pass it again to
        :meth:`from_state_dict`.
        """
        interpolation = self.interpolation
        return {
            "init_sparsity": self.init_sparsity,
            "final_sparsity": self.final_sparsity,
            "start_epoch": self.start_epoch,
            "end_epoch": self.end_epoch,
            "update_frequency": self.update_frequency,
            "interpolation": (
                interpolation if isinstance(interpolation, str) else _qualified_name(interpolation)
            ),
        }

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], interpolation: Interpolation | None = None
    ) -> GMPSchedule:
        """Inverse of :meth:`state_dict`; ``interpolation`` re-supplies a callable one."""
        check_keys(state, _STATE_KEYS, "schedule state")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"schedule state: missing key(s) {', '.join(missing)}")
        saved = state["interpolation"]
        if not isinstance(saved, str):
            raise ValueError(f"schedule state: interpolation must be a string, got {saved!r}")
        if saved in _BUILTIN:
            if interpolation is not None:
                raise ValueError(
                    f"schedule state uses the built-in interpolation {saved!r}; "
                    "do not pass interpolation"
                )
            resolved: str | Interpolation = saved
        elif interpolation is None:
            raise ValueError(
                f"schedule state was saved with the callable interpolation {saved!r}, which "
                "cannot be serialised; pass it again: "
                "GMPSchedule.from_state_dict(state, interpolation=...)"
            )
        elif not callable(interpolation):
            raise ValueError(f"interpolation must be callable, got {interpolation!r}")
        else:
            resolved = interpolation
        return cls(
            state["init_sparsity"],
            state["final_sparsity"],
            state["start_epoch"],
            state["end_epoch"],
            state["update_frequency"],
            resolved,
        )


@dataclass(frozen=True)
class LRSteps:
    """Step learning-rate decay in epochs (``MultiStepLR`` semantics), as recipes describe it."""

    lr: float
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        lr = check_number("lr", self.lr, "a finite number > 0", lambda v: v > 0)
        gamma = check_number("gamma", self.gamma, "a finite number > 0", lambda v: v > 0)
        if isinstance(self.milestones, (str, bytes)) or not hasattr(self.milestones, "__iter__"):
            raise ValueError(f"milestones must be a list of epochs, got {self.milestones!r}")
        milestones = tuple(
            sorted(
                check_number("milestones", m, "a list of finite numbers >= 0", lambda v: v >= 0)
                for m in self.milestones
            )
        )
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "gamma", gamma)
        object.__setattr__(self, "milestones", milestones)

    def lr_at(self, epoch: float) -> float:
        """``lr * gamma ** (number of milestones <= epoch)``."""
        return self.lr * self.gamma ** bisect.bisect_right(self.milestones, _as_epoch(epoch))
