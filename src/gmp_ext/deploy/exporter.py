"""Exporting a pruned model as an ordinary dense checkpoint, with its masks in a sidecar.

* :func:`export` writes a model directory any loader reads as a dense model with its exact
  zeros (a transformers model: its own ``save_pretrained``, config untouched; another module:
  ``model.safetensors``), and beside it the masks: ``gmp_masks.safetensors`` (one packed uint8
  mask per pruned parameter) and ``gmp_masks.json`` (names, shapes, targets, the GMP run's
  progress). Nothing in the weights or the config says "sparse", so vLLM, transformers and
  every other loader take it as it is (compressed-tensors 0.15 dropped its sparse formats, and
  vLLM refuses configs whose ``sparsity_config`` has targets).
* :func:`load_masks` attaches those masks to a model again, to keep training with them.
* :func:`check_masks` counts, per layer, the weights that came back where the masks prune
  (after a LoRA merge, a quantizer, a load): the check before exporting.

safetensors is the optional extra ``deploy`` (``pip install 'gmp_ext[deploy]'``).
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Union

import torch
from torch import nn

from gmp_ext._version import __version__
from gmp_ext.kernels import ops
from gmp_ext.kernels.dtensors import is_dtensor, local_tensor
from gmp_ext.model.layers import inner_layer
from gmp_ext.model.mask_store import MaskEntry, ensure_store, find_store
from gmp_ext.model.parameters import parameter_by_name, unwrap
from gmp_ext.pruning.pruner import entries_of, format_table
from gmp_ext.training.checkpoint import export_mask, import_mask
from gmp_ext.training.controller import GMP

__all__ = [
    "MASKS_FILE",
    "MASKS_INFO_FILE",
    "WEIGHTS_FILE",
    "MaskCheck",
    "MaskCheckRow",
    "check_masks",
    "export",
    "load_masks",
]

WEIGHTS_FILE = "model.safetensors"  # a plain module's weights (transformers' own name)
MASKS_FILE = "gmp_masks.safetensors"
MASKS_INFO_FILE = "gmp_masks.json"
FORMAT = 1
PathLike = Union[str, "os.PathLike[str]"]


def _import_safetensors() -> ModuleType:
    """safetensors.torch, or an ImportError naming the extra."""
    try:
        return importlib.import_module("safetensors.torch")
    except ImportError as exc:
        raise ImportError(
            f"the mask sidecar is a safetensors file: pip install 'gmp_ext[deploy]' ({exc})"
        ) from exc


def _check_module(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


# -- export ------------------------------------------------------------------------------------


def _refuse_adapters(inner: nn.Module) -> None:
    """A PEFT model's base holds the adapters' layers, which no plain loader reads."""
    wrapped = [name for name, module in inner.named_modules() if inner_layer(module) is not None]
    if wrapped:
        raise ValueError(
            f"the model holds PEFT adapter layers ({wrapped[:3]}"
            f"{' ...' if len(wrapped) > 3 else ''}): export writes a plain dense model. Merge "
            "them first: model = model.merge_and_unload(); gmp_ext.apply_masks(model) (the "
            "merge fills pruned weights in); then export(model, ...)"
        )


def _refuse_dtensors(inner: nn.Module) -> None:
    sharded = [name for name, tensor in inner.state_dict().items() if is_dtensor(tensor)]
    if sharded:
        raise ValueError(
            f"'{sharded[0]}' is a DTensor (FSDP2 / tensor parallel): export writes full tensors "
            "from one process. Load a full state dict (torch.distributed.checkpoint.state_dict."
            "get_model_state_dict with full_state_dict=True) into an unsharded copy of the "
            "model on rank 0, load_masks into it, and export that"
        )


def _controller_of(model: nn.Module) -> GMP | None:
    """The live GMP controller driving ``model``, if any."""
    found = find_store(model)
    store = None if found is None else found[0]
    live = None if store is None or store.controller is None else store.controller()
    return live if isinstance(live, GMP) else None


def _controller_state(controller: GMP | None) -> dict[str, Any] | None:
    """Where the GMP run driving the model is, and its configuration."""
    if controller is None:
        return None
    return {
        "step": controller.step_count,
        "epoch": controller.epoch,
        "stage": controller.stage,
        "sparsity": controller.sparsity,
        "config": controller.config.to_dict(),
    }


def _mask_info(entries: dict[str, MaskEntry], controller: GMP | None) -> dict[str, dict[str, Any]]:
    pruned = set(controller.layer_targets()) if controller is not None else set()
    nm = None if controller is None else controller.config.nm
    return {
        name: {
            "shape": list(entry.param.shape),
            "dtype": str(entry.param.dtype).removeprefix("torch."),
            "kept": entry.kept(),
            "target": entry.target,
            "threshold": entry.threshold,
            # Known only when a GMP controller prunes the parameter; prune_step keeps no record.
            "pattern": list(nm) if nm is not None and name in pruned else None,
        }
        for name, entry in entries.items()
    }


def export(
    model: nn.Module, directory: PathLike, *, max_shard_size: int | str | None = None
) -> list[str]:
    """Write ``model`` to ``directory`` as an ordinary dense checkpoint, its masks beside it.

    The weights, zeros included, bit for bit, in the format the model's own library reads:

    * a model with a ``save_pretrained`` method (transformers' ``PreTrainedModel``; diffusers
      and ``huggingface_hub`` mixins alike): ``model.save_pretrained(directory)`` as is, so
      ``config.json`` is the model's own (no ``quantization_config`` or ``sparsity_config`` is
      added) and the weights are standard safetensors, sharded above ``max_shard_size``
      (passed on when given; else ``save_pretrained``'s default). ``from_pretrained(directory)``
      loads it; vLLM serves it as a dense model.
    * any other module: ``directory/model.safetensors``, its state dict as
      ``safetensors.torch.save_model`` writes it (a tied tensor stored once); load it with
      ``safetensors.torch.load_model(model, path)``. ``max_shard_size`` is a ValueError here.

    The sidecar: ``gmp_masks.safetensors`` holds one packed mask per pruned parameter, named as
    the unwrapped model names it (uint8, ``ceil(numel / 8)`` bytes, bit ``i`` of the flattened
    weight set where it is kept); ``gmp_masks.json`` holds the format version, the gmp_ext
    version, how the weights were written (``"save_pretrained"`` or ``"safetensors"``), per
    mask its shape, dtype, kept count, last target, threshold and N:M pattern (known when a
    GMP controller prunes it, else null), and, when a :class:`gmp_ext.GMP` controller drives
    the model, its step, epoch, stage, sparsity and configuration. :func:`load_masks` reads it.

    DDP / DataParallel / ``torch.compile`` wrappers are seen through. A PEFT model is refused:
    its adapters would be lost or break the dense layout, so merge them first
    (``model = model.merge_and_unload(); gmp_ext.apply_masks(model)``) and export the merged
    model; :func:`check_masks` says whether the merge (or a quantizer) refilled pruned weights.
    Existing files of the same names are overwritten. Returns the names of the masks written.

    Checks everything before writing anything: TypeError for a non-Module; ValueError when
    gmp_ext holds no masks for the model, for PEFT adapter layers, for DTensor (sharded) state
    and for ``max_shard_size`` with a plain module; ImportError naming the ``deploy`` extra when
    safetensors is missing.
    """
    _check_module(model)
    safetensors_torch = _import_safetensors()
    inner, _ = unwrap(model)
    _refuse_adapters(inner)
    _refuse_dtensors(inner)
    entries = entries_of(model)
    if not entries:
        raise ValueError(
            "gmp_ext holds no masks for this model (prune it with gmp_ext.prune_step or a GMP "
            "controller, or attach masks with gmp_ext.load_masks; gmp_ext.remove drops them): "
            "export writes them beside the weights. A dense model needs no export: "
            "model.save_pretrained(directory)"
        )
    pretrained = callable(getattr(inner, "save_pretrained", None))
    if not pretrained and max_shard_size is not None:
        raise ValueError(
            f"max_shard_size={max_shard_size!r}: a module without save_pretrained is written to "
            f"one {WEIGHTS_FILE}, unsharded"
        )
    controller = _controller_of(model)
    info = {
        "format": FORMAT,
        "gmp_ext_version": __version__,
        "weights": "save_pretrained" if pretrained else "safetensors",
        "masks": _mask_info(entries, controller),
        "controller": _controller_state(controller),
    }
    packed = {name: export_mask(entry) for name, entry in entries.items()}

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    # The JSON is written last, so a directory holding one holds the masks it lists: an earlier
    # export's must not outlive a write that fails halfway.
    (folder / MASKS_INFO_FILE).unlink(missing_ok=True)
    if pretrained:
        options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        inner.save_pretrained(str(folder), **options)  # type: ignore[operator]
    else:
        safetensors_torch.save_model(inner, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    metadata = {"format": "pt", "gmp_ext_masks": str(FORMAT)}
    safetensors_torch.save_file(packed, str(folder / MASKS_FILE), metadata=metadata)
    (folder / MASKS_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return list(entries)


# -- load_masks --------------------------------------------------------------------------------


def _read_sidecar(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The sidecar's JSON and packed masks, checked against each other."""
    info_path, masks_path = folder / MASKS_INFO_FILE, folder / MASKS_FILE
    for path in (info_path, masks_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"no {path.name} in {str(folder)!r}: not a directory gmp_ext.export wrote"
            )
    try:
        info = json.loads(info_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{str(info_path)!r} is not JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise ValueError(
            f"{str(info_path)!r} is not a gmp_ext mask sidecar of format {FORMAT} (format: "
            f"{found!r}); a newer gmp_ext may have written it"
        )
    packed = _import_safetensors().load_file(str(masks_path))
    listed = info.get("masks")
    if not isinstance(listed, dict) or set(listed) != set(packed):
        names = sorted(listed) if isinstance(listed, dict) else listed
        raise ValueError(
            f"{str(folder)!r}: {MASKS_INFO_FILE} lists the masks {names} but {MASKS_FILE} "
            f"holds {sorted(packed)}"
        )
    return info, packed


def _checked_entries(
    inner: nn.Module, info: dict[str, Any], packed: dict[str, torch.Tensor]
) -> dict[str, MaskEntry]:
    """One MaskEntry per saved mask, bound to ``inner``'s parameter of that name; ValueError
    naming every name the model lacks and every parameter that differs, before any is built."""
    params: dict[str, nn.Parameter] = {}
    unknown: list[str] = []
    wrong: list[str] = []
    for name, meta in info["masks"].items():
        try:
            param = parameter_by_name(inner, name)
        except KeyError:
            unknown.append(name)
            continue
        shape = [int(s) for s in meta["shape"]]
        if list(param.shape) != shape:
            wrong.append(f"'{name}': mask of shape {shape}, parameter {list(param.shape)}")
        elif not param.is_floating_point():
            wrong.append(f"'{name}': the parameter is {param.dtype}, not floating point")
        elif is_dtensor(param):
            wrong.append(
                f"'{name}' is a DTensor: load the masks into the unsharded model, then shard it"
            )
        else:
            params[name] = param
    if unknown or wrong:
        problems = [f"no parameter named {unknown}"] if unknown else []
        problems += wrong
        raise ValueError(f"the masks do not fit this model: {'; '.join(problems)}")
    return {
        name: MaskEntry(
            param,
            import_mask(param, packed[name], name),
            float(info["masks"][name]["target"]),
            float(info["masks"][name]["threshold"]),
        )
        for name, param in params.items()
    }


def load_masks(model: nn.Module, directory: PathLike) -> list[str]:
    """Attach the masks :func:`export` wrote to ``directory`` to ``model``, by name, so
    training can go on with them (``gmp_ext.attach(model, optimizer)`` keeps them applied).

    The weights are not touched: :func:`check_masks` says whether they hold the masks' zeros
    (a model ``from_pretrained`` loaded from the same directory does), and
    :func:`gmp_ext.apply_masks` re-zeroes them. The names are those of the unwrapped model
    (DDP / ``torch.compile`` / PEFT wrappers are seen through, so the masks of an exported base
    model attach to a LoRA-wrapped copy). A GMP schedule does not resume from the sidecar
    (it records where the run was, not its history): resume a run from
    ``GMP.state_dict()``.

    Checks everything before attaching anything: FileNotFoundError naming a missing sidecar
    file; ValueError for a sidecar of another format, masks the model has no parameter for
    (all named), a parameter whose shape differs (both shapes given), a non-floating or DTensor
    parameter, a corrupt mask, and when gmp_ext already holds masks for the model
    (``gmp_ext.remove(model)`` first); ImportError naming the ``deploy`` extra. Returns the
    names of the masks attached.
    """
    _check_module(model)
    folder = Path(directory)
    info, packed = _read_sidecar(folder)
    held = sorted(entries_of(model))
    if held:
        raise ValueError(
            f"gmp_ext already holds masks for this model ({held[:3]}"
            f"{' ...' if len(held) > 3 else ''}): drop them with gmp_ext.remove(model) before "
            "loading others"
        )
    entries = _checked_entries(unwrap(model)[0], info, packed)
    ensure_store(model).set_masks(entries)
    return list(entries)


# -- check_masks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskCheckRow:
    """One masked parameter: how many elements its mask prunes, how many of those hold a
    non-zero (NaN included) now, and the largest magnitude among them."""

    name: str
    shape: tuple[int, ...]
    pruned: int
    refilled: int
    max_abs: float


@dataclass(frozen=True)
class MaskCheck:
    """What :func:`check_masks` found: one row per masked parameter."""

    rows: tuple[MaskCheckRow, ...]

    @property
    def pruned(self) -> int:
        return sum(r.pruned for r in self.rows)

    @property
    def refilled(self) -> int:
        return sum(r.refilled for r in self.rows)

    @property
    def ok(self) -> bool:
        """Whether every pruned weight is zero."""
        return self.refilled == 0

    def as_dict(self) -> dict[str, int]:
        """{name: refilled}."""
        return {r.name: r.refilled for r in self.rows}

    def __str__(self) -> str:
        header = ("name", "shape", "pruned", "refilled", "max |w|")
        lines = [
            (
                r.name,
                "x".join(map(str, r.shape)),
                str(r.pruned),
                str(r.refilled),
                f"{r.max_abs:.3g}",
            )
            for r in self.rows
        ]
        largest = max((r.max_abs for r in self.rows), default=0.0)
        lines.append(("total", "", str(self.pruned), str(self.refilled), f"{largest:.3g}"))
        return format_table(header, lines)


def check_masks(model: nn.Module) -> MaskCheck:
    """Count, per masked parameter of ``model``, the weights that are non-zero (NaN included)
    where the mask prunes: what a LoRA merge, a quantizer whose grid has no exact zero, or a
    load of other weights put back. ``report.ok`` is True when there are none; print the
    report for the table. :func:`gmp_ext.apply_masks` re-zeroes them.

    Reads the weights as the model holds them: a weight a quantizer stores as integers with a
    zero point reads as its integer codes (check the dequantized model); a DTensor parameter
    is counted in this rank's shard. Names as :func:`gmp_ext.masks` gives them. Raises
    TypeError for a non-Module, ValueError when gmp_ext holds no masks for the model.
    """
    _check_module(model)
    entries = entries_of(model)
    if not entries:
        raise ValueError(
            "gmp_ext holds no masks for this model, so there is nothing to check against "
            "(gmp_ext.load_masks(model, directory) attaches exported ones)"
        )
    rows = []
    with torch.no_grad():
        for name, entry in entries.items():
            weight = local_tensor(entry.param).detach()
            keep = ops.unpack_mask(entry.mask, weight.shape)
            pruned_values = torch.where(keep, torch.zeros_like(weight), weight)
            refilled = int(torch.count_nonzero(pruned_values))
            max_abs = float(pruned_values.abs().max()) if refilled else 0.0
            pruned = weight.numel() - int(keep.sum())
            rows.append(MaskCheckRow(name, tuple(weight.shape), pruned, refilled, max_abs))
    return MaskCheck(tuple(rows))
