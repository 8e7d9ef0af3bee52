"""The GMP controller's checkpoint: its progress, configuration and packed masks as builtins
and tensors (``torch.load(weights_only=True)`` reads it), and the checks made on resume."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gmp_ext import distributed
from gmp_ext.kernels import primitives
from gmp_ext.kernels.dtensors import is_dtensor
from gmp_ext.kernels.layout import mask_bytes
from gmp_ext.model.mask_store import MaskEntry
from gmp_ext.training.config import GMPConfig

__all__ = ["FORMAT", "Progress", "decode", "encode", "export_mask", "import_mask"]

FORMAT = 1
logger = logging.getLogger("gmp_ext")
_KEYS = (
    "format",
    "config",
    "step",
    "epoch_mark",
    "last_update",
    "shapes",
    "masks",
    "weight_decay",
    "history",
)


@dataclass
class Progress:
    """Where a GMP run is: optimizer steps taken, the step of the last ``epoch_end``, the last
    update and every update's record, and the param groups' weight decay before fine-tuning
    replaced it (None until then)."""

    step: int = 0
    epoch_mark: int = 0
    last_update: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    original_decay: list[float] | None = None

    def record(
        self,
        epoch: float,
        target: float,
        stage: str,
        layers: dict[str, Any],
        totals: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Record a mask update at the current step (``layers``: {name: {metric: value}},
        ``totals``: the same over all layers; :mod:`gmp_ext.training.telemetry` defines them) and
        return the record."""
        record = {"epoch": epoch, "step": self.step, "target": target, "stage": stage}
        record.update(totals)
        record["layers"] = layers
        self.history.append(record)
        self.last_update = {"step": self.step, "epoch": epoch, "target": target}
        return record

    def start_fine_tuning(self, optimizer: torch.optim.Optimizer, decay: float) -> None:
        """At the first fine-tuning step, remember the param groups' weight decay and set it to
        ``decay`` (once: later calls do nothing)."""
        if self.original_decay is not None:
            return
        self.original_decay = [group["weight_decay"] for group in optimizer.param_groups]
        self.set_decay(optimizer, decay)
        logger.info(
            "GMP: fine-tuning from step %d: weight_decay %s -> %g",
            self.step,
            self.original_decay,
            decay,
        )

    @staticmethod
    def set_decay(optimizer: torch.optim.Optimizer, decay: float) -> None:
        for group in optimizer.param_groups:
            group["weight_decay"] = decay


def encode(
    config: GMPConfig,
    progress: Progress,
    stage: str,
    params: Mapping[str, nn.Parameter],
    entries: Mapping[str, MaskEntry],
) -> dict[str, Any]:
    """The state dict of a run (masks of the ``params`` that have one, and what the score
    observed since the last update)."""
    return {
        "format": FORMAT,
        "config": config.to_dict(),
        "step": progress.step,
        "stage": stage,
        "epoch_mark": progress.epoch_mark,
        "last_update": copy.copy(progress.last_update),
        "shapes": {n: list(p.shape) for n, p in params.items()},
        "masks": {
            n: {
                "mask": export_mask(entries[n]),
                "target": entries[n].target,
                "threshold": entries[n].threshold,
            }
            for n in params
            if n in entries
        },
        "weight_decay": {"original": copy.copy(progress.original_decay)},
        "history": copy.deepcopy(progress.history),
        "score_state": config.score.state_dict(),
    }


def _check_model(saved: Mapping[str, Any], params: Mapping[str, nn.Parameter]) -> None:
    shapes = {n: list(p.shape) for n, p in params.items()}
    missing = [n for n in shapes if n not in saved]
    unexpected = [n for n in saved if n not in shapes]
    if missing or unexpected:
        raise ValueError(
            "the GMP state belongs to another model: parameters missing from the state "
            f"{missing}, in the state but not pruned here {unexpected}"
        )
    wrong = [f"'{n}' {list(saved[n])} != {s}" for n, s in shapes.items() if list(saved[n]) != s]
    if wrong:
        raise ValueError(f"the GMP state belongs to another model: shapes differ for {wrong}")


def decode(
    state: object,
    config: GMPConfig,
    params: Mapping[str, nn.Parameter],
    param_groups: int,
) -> tuple[Progress, dict[str, MaskEntry]]:
    """The progress and mask entries of a saved run, checked against this run's configuration,
    parameters and optimizer (``param_groups``): ValueError otherwise, nothing being built."""
    if (
        not isinstance(state, Mapping)
        or any(k not in state for k in _KEYS)
        or not isinstance(state["config"], Mapping)
    ):
        raise ValueError(f"not a GMP state_dict: expected the keys {list(_KEYS)}")
    if state["format"] != FORMAT:
        raise ValueError(f"GMP state format {state['format']!r} is not supported")
    differ = config.differences(state["config"])
    if differ:
        raise ValueError("the GMP state was saved with a different " + "; ".join(differ))
    _check_model(state["shapes"], params)
    strays = [n for n in state["masks"] if n not in params]
    if strays:
        raise ValueError(f"GMP state: masks of parameters not pruned here {strays}")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"GMP state: step must be an integer >= 0, got {step!r}")
    entries = {
        n: MaskEntry(
            params[n],
            import_mask(params[n], saved["mask"], n),
            float(saved["target"]),
            float(saved["threshold"]),
        )
        for n, saved in state["masks"].items()
    }
    original = state["weight_decay"]["original"]
    if original is not None and len(original) != param_groups:
        raise ValueError(
            f"GMP state: weight decay of {len(original)} param groups saved, the optimizer "
            f"has {param_groups}"
        )
    progress = Progress(
        step=step,
        epoch_mark=int(state["epoch_mark"]),
        last_update=None if state["last_update"] is None else dict(state["last_update"]),
        history=copy.deepcopy(list(state["history"])),
        original_decay=None if original is None else list(original),
    )
    return progress, entries


def export_mask(entry: MaskEntry) -> torch.Tensor:
    """The entry's packed mask for a checkpoint: a CPU copy of exactly ``ceil(numel / 8)`` bytes,
    so it does not depend on the storage padding or on the device it was built on (a sharded
    parameter's: see ``distributed.export_sharded_mask``)."""
    if is_dtensor(entry.param):
        return distributed.export_sharded_mask(entry.param, entry.mask)
    return entry.mask[: mask_bytes(entry.numel)].cpu().clone()


def import_mask(param: nn.Parameter, packed: object, name: str) -> torch.Tensor:
    """A mask saved by :func:`export_mask`, checked against ``param`` and copied into the mask
    storage layout on the parameter's device (raises ValueError naming ``name`` otherwise)."""
    if is_dtensor(param):
        return distributed.import_sharded_mask(param, packed, name)
    numel = param.numel()
    size = mask_bytes(numel)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"mask of parameter '{name}' must be a 1-D uint8 tensor of packed bits")
    if packed.numel() != size:
        raise ValueError(
            f"mask of parameter '{name}' has {packed.numel()} bytes; its {numel} elements "
            f"need {size}"
        )
    # Bits past the last element would be counted as kept elements by the popcount.
    if numel % 8 and int(packed[-1]) >> (numel % 8):
        raise ValueError(f"mask of parameter '{name}' has bits set past its {numel} elements")
    mask = primitives.new_mask(param)
    mask[:size] = packed.to(mask.device)
    return mask
