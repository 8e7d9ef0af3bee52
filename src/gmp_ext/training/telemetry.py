"""Telemetry of GMP's mask updates: what each update did to every pruned layer, and where it is
reported (``gmp.history``, the ``gmp_ext`` logger, ``SummaryWriter``-like writers).

Per pruned parameter (a layer) and mask update, besides ``target``, ``achieved`` (zeros in the
weights after the update / elements) and ``threshold`` (|w| of the last pruned element):

* ``ties``: weights whose |w| equals the update's threshold, counted among all of the layer's
  weights as the selection ranked them (previous masks re-applied, this update's not yet). The
  order (|w|, index) splits them: the lowest indices are pruned. 0 when the selection prunes
  nothing (there is no threshold then). In global scope the threshold is the cut over all
  layers, so a layer may hold ties without pruning any of them.
* ``regrowth``: weights pruned by the previous update that are non-zero just before this update
  re-masks them, i.e. after the optimizer step at which the update falls and before GMP's
  re-apply. GMP re-zeroes pruned weights after every step, so this is what that last step moved
  off zero (the gradients, momentum or Adam moments of pruned weights: ``mask_gradients=True``
  keeps plain SGD at 0) plus whatever wrote to the weights outside the controlled steps (a
  second optimizer, a manual update, a missed re-mask). ``None`` at a layer's first update.
* ``newly_pruned`` / ``revived``: weights kept by the previous masks and pruned by this update /
  pruned by the previous masks and kept by this update; ``None`` at a layer's first update.
* ``churn``: ``(newly_pruned + revived) / kept_before``, the mask bits this update changed as a
  fraction of the weights the previous masks kept (``None`` at the first update or when the
  previous masks kept nothing). A rising cubic schedule alone gives
  ``(s_new - s_old) / (1 - s_old)``; more than that means revived weights.

Each record also holds the same quantities over all layers: ``achieved`` (zeros / elements),
the sums of ``ties``, ``regrowth``, ``newly_pruned``, ``revived``, and ``churn`` = changed bits
/ kept-before bits of the layers that had masks. Counting costs, per update, two passes over
each layer's weights (regrowth, ties; temporaries the size of the layer) and a few over its
packed masks (1/8 byte per weight), never anything per training step.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gmp_ext import distributed
from gmp_ext.kernels import ops, primitives
from gmp_ext.kernels.dtensors import local_tensor
from gmp_ext.model.mask_store import MaskEntry, MaskStore
from gmp_ext.pruning.strategies import Selection

__all__ = ["LAYER_METRICS", "ScalarWriter", "UpdateProbe", "Writers", "log_update", "scalars"]

logger = logging.getLogger("gmp_ext")

# The per-layer keys of a history record, in the order they are logged.
LAYER_METRICS = (
    "target",
    "achieved",
    "threshold",
    "ties",
    "regrowth",
    "newly_pruned",
    "revived",
    "churn",
)
_TOTALS = ("achieved", "ties", "regrowth", "newly_pruned", "revived", "churn")


class ScalarWriter(Protocol):
    """Anything with ``add_scalar(tag, value, step)``: ``torch.utils.tensorboard.SummaryWriter``,
    ``tensorboardX``, or a class of your own."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int, /) -> Any: ...


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


class UpdateProbe:
    """The measurements of one mask update, taken in two places.

    Made just before the update re-masks the weights (``names``: the pruned parameters): it
    counts regrowth and copies the previous packed masks (``ceil(n / 8)`` bytes per layer).
    :meth:`inspect` runs between the update's selection and its apply, on the weights the
    selection ranked: ties at each threshold and the bits the new masks changed. Sharded
    (DTensor) parameters are counted over all shards (collectives: every rank calls alike).
    """

    def __init__(self, store: MaskStore, names: Sequence[str]) -> None:
        store.resolve()
        previous = {n: store.entries[n] for n in names if n in store.entries}
        self.masks = {n: e.mask.clone() for n, e in previous.items()}
        with torch.no_grad():
            counts = [
                int(
                    (
                        (local_tensor(e.param).detach() != 0)
                        & ~ops.unpack_mask(e.mask, local_tensor(e.param).shape)
                    ).sum()
                )
                for e in previous.values()
            ]
        params = [e.param for e in previous.values()]
        self.regrowth = dict(zip(previous, distributed.summed_over_shards(params, counts)))
        self.ties: dict[str, int] = {}
        self.changes: dict[str, tuple[int, int, int]] = {}  # newly pruned, revived, kept before

    def inspect(
        self,
        entries: Mapping[str, MaskEntry],
        selection: Selection,
        targets: Mapping[str, float],
    ) -> None:
        """Ties and mask changes of the new ``entries`` (before their apply), selected by
        ``selection`` at ``targets``."""
        params = [e.param for e in entries.values()]
        counts = selection.counts([p.numel() for p in params], [targets[n] for n in entries])
        if not selection.per_tensor_targets:
            counts = counts * len(params)  # one cut for all: it prunes for every tensor or none
        prunes = {n: c > 0 for n, c in zip(entries, counts)}
        with torch.no_grad():
            ties = [
                int((local_tensor(e.param).detach().abs() == e.threshold).sum()) if prunes[n] else 0
                for n, e in entries.items()
            ]
        self.ties = dict(zip(entries, distributed.summed_over_shards(params, ties)))
        changed = {n: e for n, e in entries.items() if n in self.masks}
        columns: list[list[int]] = [[], [], []]
        for name, entry in changed.items():
            old = self.masks[name].to(entry.mask.device)
            numel = entry.numel
            columns[0].append(primitives.popcount(old & ~entry.mask, numel))
            columns[1].append(primitives.popcount(entry.mask & ~old, numel))
            columns[2].append(primitives.popcount(old, numel))
        held = [e.param for e in changed.values()]
        totals = [distributed.summed_over_shards(held, column) for column in columns]
        self.changes = {n: (a, b, c) for n, a, b, c in zip(changed, *totals)}

    def layer(self, name: str) -> dict[str, Any]:
        """The update's telemetry of one layer (see the module docstring)."""
        ties = self.ties.get(name, 0)
        if name not in self.changes:
            return {"ties": ties, "regrowth": None, "newly_pruned": None, "revived": None}
        newly, revived, kept = self.changes[name]
        return {
            "ties": ties,
            "regrowth": self.regrowth[name],
            "newly_pruned": newly,
            "revived": revived,
            "churn": _ratio(newly + revived, kept),
        }

    def record_layers(
        self,
        params: Mapping[str, nn.Parameter],
        targets: Mapping[str, float],
        zeros: Mapping[str, int],
        thresholds: Mapping[str, float],
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """The record's ``layers`` ({name: {metric: value}}, keys :data:`LAYER_METRICS`) and its
        totals over all layers."""
        layers = {}
        for name, param in params.items():
            row = {
                "target": targets[name],
                "achieved": zeros[name] / param.numel() if param.numel() else 0.0,
                "threshold": thresholds[name],
                "churn": None,
            }
            row.update(self.layer(name))
            layers[name] = {k: row[k] for k in LAYER_METRICS}
        numel = sum(p.numel() for p in params.values())
        with_masks = [n for n in params if n in self.changes]
        changed = sum(self.changes[n][0] + self.changes[n][1] for n in with_masks)
        totals = {
            "achieved": _ratio(sum(zeros.values()), numel) or 0.0,
            "ties": sum(self.ties.values()),
            "regrowth": sum(self.regrowth[n] for n in with_masks) if with_masks else None,
            "newly_pruned": sum(self.changes[n][0] for n in with_masks) if with_masks else None,
            "revived": sum(self.changes[n][1] for n in with_masks) if with_masks else None,
            "churn": _ratio(changed, sum(self.changes[n][2] for n in with_masks)),
        }
        return layers, totals


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def log_update(record: Mapping[str, Any]) -> None:
    """One INFO line per update on the ``gmp_ext`` logger (target, achieved per layer, totals)
    and one DEBUG line per layer with every metric."""
    logger.info(
        "GMP update at step %d (epoch %.4g, %s): target %.4f; achieved %s; ties %s, regrowth %s, "
        "newly pruned %s, revived %s, churn %s",
        record["step"],
        record["epoch"],
        record["stage"],
        record["target"],
        ", ".join(f"{n} {v['achieved']:.4f}" for n, v in record["layers"].items()),
        *(_fmt(record.get(k)) for k in _TOTALS[1:]),
    )
    if logger.isEnabledFor(logging.DEBUG):
        for name, row in record["layers"].items():
            logger.debug(
                "GMP step %d %s: %s",
                record["step"],
                name,
                ", ".join(f"{k} {_fmt(row.get(k))}" for k in LAYER_METRICS),
            )


def scalars(
    record: Mapping[str, Any], prefix: str = "gmp", layers: bool = True
) -> dict[str, float]:
    """The record as ``{tag: value}`` for a metrics logger: ``<prefix>/target`` and the totals
    (``<prefix>/achieved``, ``/ties``, ``/regrowth``, ``/newly_pruned``, ``/revived``,
    ``/churn``), and with ``layers`` every layer's metrics as ``<prefix>/<layer>/<metric>``.
    Metrics that are ``None`` (regrowth and churn at a first update) are left out."""
    values: dict[str, Any] = {f"{prefix}/target": record["target"]}
    values.update({f"{prefix}/{k}": record.get(k) for k in _TOTALS})
    if layers:
        for name, row in record["layers"].items():
            values.update({f"{prefix}/{name}/{k}": row.get(k) for k in LAYER_METRICS})
    return {tag: float(v) for tag, v in values.items() if v is not None}


class Writers:
    """The writers a controller reports every update to (:meth:`gmp_ext.GMP.log_to`)."""

    def __init__(self) -> None:
        # An OrderedDict, which RemovableHandle can reference weakly (a dict cannot be).
        self.writers: OrderedDict[int, tuple[ScalarWriter, str, bool]] = OrderedDict()

    def add(
        self,
        writer: ScalarWriter,
        prefix: str,
        layers: bool,
        history: Sequence[Mapping[str, Any]],
    ) -> RemovableHandle:
        """Register ``writer`` and write the updates of ``history`` to it at once."""
        if not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(
                f"writer must have an add_scalar(tag, value, step) method (a SummaryWriter), "
                f"got {type(writer).__name__}"
            )
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        handle = RemovableHandle(self.writers)
        self.writers[handle.id] = (writer, prefix, bool(layers))
        for record in history:
            self._write(writer, prefix, layers, record)
        return handle

    def emit(self, record: Mapping[str, Any]) -> None:
        """Log the update and write it to every writer."""
        log_update(record)
        for writer, prefix, layers in list(self.writers.values()):
            self._write(writer, prefix, layers, record)

    @staticmethod
    def _write(writer: ScalarWriter, prefix: str, layers: bool, record: Mapping[str, Any]) -> None:
        for tag, value in scalars(record, prefix, layers).items():
            writer.add_scalar(tag, value, record["step"])
