"""Compressed checkpoints of a pruned model, and the N:M layout check.

* :func:`save_sparse` / :func:`load_sparse` write and read a checkpoint in compressed-tensors'
  sparse formats (``sparse-bitmask`` for unstructured sparsity, ``sparse-24-bitmask`` when every
  compressed weight is 2:4 sparse): one ``model.safetensors`` plus a ``config.json`` whose
  ``quantization_config`` holds compressed-tensors' ``sparsity_config`` (a directory holding
  another ``config.json``, such as ``save_pretrained``'s, is refused). For serving (vLLM,
  transformers) write a dense checkpoint with :func:`gmp_ext.export` instead: neither reads
  these formats any more.
* :func:`is_nm_sparse` checks the N:M layout the 2:4 format and
  :func:`gmp_ext.deploy.semi_structured.to_semi_structured` need.

compressed-tensors is the optional extra ``deploy`` (``pip install 'gmp_ext[deploy]'``). Its
config classes describe the checkpoint and its bit packing is used; the tensors are encoded
here because compressed-tensors 0.15 and later no longer ship the sparse compressors (0.14.0.1,
the last release with them, decompresses these files to the saved weights: see
``tests/test_deploy.py``), and because its own 2:4 encoder picks the kept zeros of a group by
``topk`` (here: the lowest indices, so a save is deterministic).

N:M groups, as everywhere in gmp_ext: ``m`` consecutive elements along a weight's reduction
(input) dimension (:mod:`gmp_ext.model.layers`). The ``sparse-24-bitmask`` format packs groups along
the rows of a 2-D weight, so only ``[out, in]`` weights (Linear) are stored in it.
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

from gmp_ext.kernels.dtensors import is_dtensor
from gmp_ext.model.layers import reduction_last
from gmp_ext.model.parameters import ParamSpec, reduction_dims, select_parameters, unwrap

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "StoredTensor",
    "is_nm_sparse",
    "load_sparse",
    "save_sparse",
]

WEIGHTS_FILE = "model.safetensors"  # the name compressed-tensors and transformers look for
CONFIG_FILE = "config.json"
BITMASK = "sparse-bitmask"
SPARSE_24 = "sparse-24-bitmask"
DENSE = "dense"
FORMATS = ("auto", BITMASK, SPARSE_24)
# The tensors each format stores for a weight "<module>.weight", named "<module>.<part>".
PARTS = {
    BITMASK: ("shape", "compressed", "bitmask", "row_offsets"),
    SPARSE_24: ("shape", "compressed", "bitmask"),
}
ALIASES_KEY = "gmp_ext.aliases"  # safetensors metadata: tied names -> the name stored
PathLike = Union[str, "os.PathLike[str]"]


def _import_extra() -> tuple[ModuleType, ModuleType]:
    """compressed_tensors and safetensors.torch, or an ImportError naming the extra."""
    try:
        return (
            importlib.import_module("compressed_tensors"),
            importlib.import_module("safetensors.torch"),
        )
    except ImportError as exc:
        raise ImportError(
            "sparse checkpoints need compressed-tensors and safetensors: "
            f"pip install 'gmp_ext[deploy]' ({exc})"
        ) from exc


# -- N:M layout ---------------------------------------------------------------------------------


def is_nm_sparse(tensor: torch.Tensor, n: int = 2, m: int = 4, *, reduction_dim: int = 1) -> bool:
    """Whether every group of ``m`` consecutive elements along dimension ``reduction_dim`` of
    ``tensor`` holds at most ``n`` non-zeros (``-0.0`` is a zero, NaN is not). The default is
    the input dimension of Linear (``[out, in]``) and ConvNd (``[out, in, *kernel]``: groups
    of input channels at each kernel position) weights; transformers' ``Conv1D`` and
    ``ConvTranspose`` weights take ``reduction_dim=0``.

    False when that dimension's size is not a multiple of ``m`` (the 2:4 kernels and formats
    need whole groups), and for an empty or 0-d tensor. Raises ValueError unless ``0 <= n <=
    m`` and ``m >= 1``, or ``reduction_dim`` is not a dimension of a tensor of 2 or more
    dimensions, TypeError for a non-tensor.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not (isinstance(n, int) and isinstance(m, int) and m >= 1 and 0 <= n <= m):
        raise ValueError(f"N:M needs integers 0 <= n <= m, m >= 1; got n={n!r}, m={m!r}")
    if tensor.dim() == 0 or tensor.numel() == 0:
        return False
    ndim = max(tensor.dim(), 2)
    if not isinstance(reduction_dim, int) or not 0 <= reduction_dim < ndim:
        raise ValueError(
            f"reduction_dim must be a dimension of the tensor of shape {tuple(tensor.shape)}, "
            f"got {reduction_dim!r}"
        )
    if tensor.dim() == 1 or tensor.shape[reduction_dim] % m:
        return False
    groups = reduction_last(tensor.detach(), reduction_dim).reshape(-1, m)
    return bool(((groups != 0).sum(-1) <= n).all())


def _keep_24(weight: torch.Tensor) -> torch.Tensor:
    """The 2:4 format's kept positions: exactly 2 per group, the non-zeros and then the
    lowest-indexed zeros (``weight`` 2-D, 2:4 sparse)."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    nonzero = groups != 0
    zero = ~nonzero
    missing = 2 - nonzero.sum(-1, keepdim=True)
    keep = nonzero | (zero & (zero.cumsum(-1) <= missing))
    return keep.reshape(weight.shape)


# -- saving ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    """How :func:`save_sparse` stored one state-dict entry: ``format`` is ``"sparse-bitmask"``,
    ``"sparse-24-bitmask"``, ``"dense"`` or ``"tied"`` (an alias of ``tied_to``, not stored
    again); bytes are the tensor data in the file (the safetensors header not counted)."""

    format: str
    dense_bytes: int
    stored_bytes: int
    tied_to: str = ""

    @property
    def ratio(self) -> float:
        """Stored over dense bytes (0.0 for an empty tensor)."""
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 0.0


def _compressed_bytes(weight: torch.Tensor, fmt: str) -> int:
    rows, cols = weight.shape
    mask_bytes = rows * ((cols + 7) // 8)
    if fmt == SPARSE_24:
        return rows * (cols // 2) * weight.element_size() + mask_bytes + 2 * 8
    nonzeros = int((weight != 0).sum())
    return nonzeros * weight.element_size() + mask_bytes + rows * 8 + 2 * 8


def _encode(
    prefix: str, weight: torch.Tensor, fmt: str, pack_bitmasks: Any
) -> dict[str, torch.Tensor]:
    """compressed-tensors' tensors for one 2-D weight, on the CPU. Zeros are stored as +0.0
    (as compressed-tensors does: its bitmask marks ``weight != 0``)."""
    weight = weight.detach().cpu().contiguous()
    keep = _keep_24(weight) if fmt == SPARSE_24 else weight != 0
    values = weight[keep]
    values[values == 0] = 0.0  # -0.0 (kept in a 2:4 group, or as a zero) as +0.0
    rows, cols = weight.shape
    parts = {
        "shape": torch.tensor([rows, cols]),
        "compressed": values,
        "bitmask": pack_bitmasks(keep),
    }
    if fmt == SPARSE_24:
        parts["shape"] = parts["shape"].reshape(-1, 1)
        parts["compressed"] = values.reshape(rows, cols // 2)
    else:
        counts = keep.sum(-1)
        parts["row_offsets"] = torch.cumsum(counts, 0) - counts
    return {f"{prefix}.{part}": tensor for part, tensor in parts.items()}


def _state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict(keep_vars=False)
    for name, tensor in state.items():
        if is_dtensor(tensor):
            raise ValueError(
                f"'{name}' is a DTensor (FSDP2 / tensor parallel): save_sparse writes full "
                "tensors from one process. Gather a full state dict first, e.g. load "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                "options=StateDictOptions(full_state_dict=True, cpu_offload=True)) into an "
                "unsharded copy of the model on rank 0, and save that"
            )
    return state


def _storage_key(tensor: torch.Tensor) -> tuple[object, ...]:
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def _candidates(
    model: nn.Module, params: ParamSpec, exclude: list[str] | str | None
) -> dict[str, torch.Tensor]:
    """The selected 2-D ``<module>.weight`` tensors, by the unwrapped model's names (the
    default selection's other matmul weights, ``nn.MultiheadAttention``'s ``in_proj_weight``,
    are stored dense)."""
    found: dict[str, torch.Tensor] = {}
    for name, param in select_parameters(model, params, exclude).items():
        if params is None and not name.endswith(".weight"):
            continue
        if not name.endswith(".weight"):
            raise ValueError(
                f"parameter '{name}': compressed-tensors stores only '<module>.weight' "
                "tensors compressed; leave it out of params="
            )
        if param.dim() == 2:
            found[name] = param
    return found


def _choose_format(fmt: str, compressible: dict[str, torch.Tensor], rows_24: set[str]) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    not_24 = [n for n in compressible if n not in rows_24]
    if fmt == SPARSE_24 and not_24:
        raise ValueError(
            f"format='{SPARSE_24}' needs every compressed weight 2:4 sparse along its rows, "
            "which must be its reduction dimension (at most 2 non-zeros in each group of 4, "
            f"rows a multiple of 4 long: an [out, in] weight); not: {not_24}"
        )
    if fmt == "auto":
        return SPARSE_24 if compressible and not not_24 else BITMASK
    return fmt


def _config_to_write(path: Path, key: str, quantization: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` to write: ``{key: quantization}``, over an existing file only when
    save_sparse wrote it. Any other existing file is a ValueError: a transformers config
    (``save_pretrained``) would keep its ``model_type`` beside compressed weights that
    ``from_pretrained`` no longer decompresses (it reads them as missing and initializes them
    at random), and any other file would lose its keys."""
    if not path.is_file():
        return {key: quantization}
    try:
        existing = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(
            f"{str(path)!r} exists and is not JSON ({exc}); save_sparse writes its own "
            "config.json: save to another directory"
        ) from None
    if not isinstance(existing, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object; save to another directory")
    previous = existing.get(key)
    written_here = (
        set(existing) == {key}
        and isinstance(previous, dict)
        and previous.get("quant_method") == "compressed-tensors"
        and "sparsity_config" in previous
    )
    if written_here:
        return {key: quantization}
    if "model_type" in existing:
        raise ValueError(
            f"{str(path)!r} is a transformers config (model_type {existing['model_type']!r}): "
            "save_sparse would replace the model's weights with compressed parts that "
            "from_pretrained no longer decompresses (transformers 5 reads them as missing and "
            "initializes them at random), and leave the directory unloadable as it is. Write "
            "the archive to another directory; for a directory from_pretrained and vLLM load, "
            "use gmp_ext.export"
        )
    raise ValueError(
        f"{str(path)!r} exists and save_sparse did not write it (keys "
        f"{sorted(existing)[:5]}); save_sparse does not change it: save to another directory"
    )


def save_sparse(
    model: nn.Module,
    directory: PathLike,
    *,
    params: ParamSpec = None,
    exclude: list[str] | str | None = None,
    format: str = "auto",
) -> dict[str, StoredTensor]:
    """Write ``model``'s state dict to ``directory`` as a compressed-tensors sparse checkpoint.

    ``directory`` (created if needed) then holds ``model.safetensors`` (overwritten) and
    ``config.json`` with a ``quantization_config`` ``{"quant_method": "compressed-tensors",
    "version": ..., "sparsity_config": {"format", "targets" (the compressed modules' names),
    "ignore", "global_sparsity" (zeros over all parameters), "sparsity_structure"}}``, as
    compressed-tensors' ``ModelCompressor`` writes it. A ``config.json`` save_sparse wrote is
    replaced; any other existing one is a ValueError and nothing is written: into a
    ``save_pretrained`` directory the archive would replace weights that ``from_pretrained``
    could then no longer read (see below), so the model stays loadable only elsewhere.

    Who reads it: :func:`load_sparse`, and compressed-tensors releases before 0.15 (0.15
    removed the sparse decompressors; vLLM refuses a ``sparsity_config`` with targets).
    transformers 5 with compressed-tensors 0.15 or later does not decompress it:
    ``from_pretrained`` reports the compressed weights missing and initializes them at random
    (measured with transformers 5.25, compressed-tensors 0.20). To hand a pruned model to
    transformers, vLLM or any other loader as an ordinary dense model, use
    :func:`gmp_ext.export` instead.

    Which tensors are compressed: of the weights ``params``/``exclude`` select (the rules of
    :func:`gmp_ext.select_parameters`; default every Linear/Conv weight), the 2-D ones that the
    format stores in fewer bytes than dense. Every other state-dict entry (biases, norms,
    buffers, Conv kernels, dense weights) is stored as it is. The format is one per checkpoint
    (compressed-tensors' config has one): ``"auto"`` takes ``"sparse-24-bitmask"`` (2:4 values
    ``[rows, cols / 2]`` plus a bitmask) when every compressed weight is 2:4 sparse (see
    :func:`is_nm_sparse`), else ``"sparse-bitmask"`` (the non-zeros, a bitmask of
    ``ceil(cols / 8)`` bytes per row, row offsets). At 90% sparsity a bitmask-stored weight
    takes about 0.13x its dense bytes in fp32 and 0.16x in bf16.

    Names are the unwrapped model's (DDP / DataParallel / ``torch.compile`` prefixes dropped);
    a tied tensor is stored once, under its first name (the others are listed in the
    safetensors metadata). DTensor (sharded) state is a ValueError. Tensors may be on any device
    and non-contiguous; fp32, fp16 and bf16 weights are compressed. Zeros in compressed weights
    are stored as +0.0: ``-0.0`` there loads as ``+0.0``, every other bit pattern (NaN
    included) as saved.

    Returns ``{state-dict name: StoredTensor}``. Raises ImportError naming the ``deploy`` extra
    when compressed-tensors or safetensors is missing, ValueError for an unknown ``format``, a
    forced ``"sparse-24-bitmask"`` over a weight that is not 2:4 sparse, or a selected
    parameter that is not a ``<module>.weight``, and for an existing ``config.json`` it did
    not write (see above).
    """
    compressed_tensors, safetensors_torch = _import_extra()
    helpers = importlib.import_module("compressed_tensors.utils")
    config_module = importlib.import_module("compressed_tensors.config")
    base = importlib.import_module("compressed_tensors.base")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    candidates = _candidates(model, params, exclude)
    inner, _ = unwrap(model)
    state = _state_of(inner)

    def smaller(weight: torch.Tensor, fmt: str) -> bool:
        return _compressed_bytes(weight, fmt) < weight.numel() * weight.element_size()

    # 2:4 along rows that are the reduction dimension: transformers' Conv1D ([in, out]) is not.
    dims = dict(zip(candidates, reduction_dims(inner, list(candidates))))
    rows_24 = {n for n, w in candidates.items() if dims[n] == 1 and is_nm_sparse(w)}
    compressible = {n: w for n, w in candidates.items() if smaller(w, BITMASK)}
    fmt = _choose_format(format, compressible, rows_24)
    if fmt == SPARSE_24:
        compressible = {n: w for n, w in candidates.items() if n in rows_24 and smaller(w, fmt)}

    # A tied weight is stored once, under its first state-dict name.
    compress = {_storage_key(w.detach()) for w in compressible.values()}
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, StoredTensor] = {}
    first_name: dict[tuple[object, ...], str] = {}
    aliases: dict[str, str] = {}
    targets: list[str] = []
    for name, tensor in state.items():
        dense_bytes = tensor.numel() * tensor.element_size()
        key = _storage_key(tensor)
        if tensor.numel() and key in first_name:
            aliases[name] = first_name[key]
            report[name] = StoredTensor("tied", dense_bytes, 0, first_name[key])
            continue
        if tensor.numel():
            first_name[key] = name
        if key in compress and name.endswith(".weight"):
            targets.append(name[: -len(".weight")])
            parts = _encode(targets[-1], tensor, fmt, helpers.pack_bitmasks)
            clash = sorted(set(parts) & set(state))
            if clash:
                raise ValueError(
                    f"cannot compress '{name}': the model already has state named {clash}, "
                    "the names compressed-tensors gives the compressed parts"
                )
            tensors.update(parts)
            stored = sum(t.numel() * t.element_size() for t in parts.values())
            report[name] = StoredTensor(fmt, dense_bytes, stored)
        else:
            # safetensors refuses tensors sharing memory: a view of a stored tensor is copied.
            shares = any(k[1] == key[1] for k in first_name if k != key)
            stored_tensor = tensor.detach().cpu().contiguous()
            tensors[name] = stored_tensor.clone() if shares else stored_tensor
            report[name] = StoredTensor(DENSE, dense_bytes, dense_bytes)

    zeros = total = 0
    for param in {id(p): p for p in inner.parameters()}.values():
        if param.is_floating_point():
            zeros += int((param.detach() == 0).sum())
            total += param.numel()
    if fmt == SPARSE_24:
        config_class = config_module.Sparse24BitMaskConfig
    else:
        config_class = config_module.BitmaskConfig
    sparsity_config = config_class(
        targets=targets,
        ignore=[],
        global_sparsity=zeros / total if total else 0.0,
        sparsity_structure="2:4" if fmt == SPARSE_24 else "unstructured",
    )
    quantization = {
        base.COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        base.QUANTIZATION_METHOD_NAME: "compressed-tensors",
        base.SPARSITY_CONFIG_NAME: sparsity_config.model_dump(),
    }
    folder = Path(directory)
    config = _config_to_write(folder / CONFIG_FILE, base.QUANTIZATION_CONFIG_NAME, quantization)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", ALIASES_KEY: json.dumps(aliases)}
    safetensors_torch.save_file(tensors, str(folder / WEIGHTS_FILE), metadata=metadata)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return report


# -- loading -----------------------------------------------------------------------------------


def _read_config(folder: Path) -> str:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_FILE} in {str(folder)!r}: not a save_sparse checkpoint"
        )
    config = json.loads(path.read_text()).get("quantization_config") or {}
    fmt = (config.get("sparsity_config") or {}).get("format")
    if config.get("quant_method") != "compressed-tensors" or fmt not in PARTS:
        raise ValueError(
            f"{str(path)!r} describes no compressed-tensors sparse checkpoint "
            f"(quantization_config.sparsity_config.format: {fmt!r}; load_sparse reads "
            f"{sorted(PARTS)})"
        )
    return str(fmt)


def _decode(prefix: str, parts: dict[str, torch.Tensor], unpack_bitmasks: Any) -> torch.Tensor:
    shape = [int(s) for s in parts["shape"].reshape(-1).tolist()]
    keep = unpack_bitmasks(parts["bitmask"], shape)
    values = parts["compressed"].reshape(-1)
    if keep.shape != torch.Size(shape) or int(keep.sum()) != values.numel():
        raise ValueError(
            f"'{prefix}.weight' in the checkpoint is corrupt: {int(keep.sum())} bits set in its "
            f"bitmask for a shape {shape}, {values.numel()} values stored"
        )
    weight = torch.zeros(shape, dtype=values.dtype)
    weight[keep] = values
    return weight


def _read_tensors(folder: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The checkpoint's dense state dict (compressed weights decoded) and its tied names."""
    _, safetensors_torch = _import_extra()
    safetensors = importlib.import_module("safetensors")
    helpers = importlib.import_module("compressed_tensors.utils")
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {str(folder)!r}")
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    stored = safetensors_torch.load_file(str(path))
    prefixes = [k[: -len(".compressed")] for k in stored if k.endswith(".compressed")]
    tensors: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        names = {part: f"{prefix}.{part}" for part in PARTS[fmt]}
        missing = [n for n in names.values() if n not in stored]
        if missing:
            raise ValueError(f"'{prefix}.weight' in the checkpoint lacks {missing} ({fmt})")
        parts = {part: stored.pop(name) for part, name in names.items()}
        tensors[f"{prefix}.weight"] = _decode(prefix, parts, helpers.unpack_bitmasks)
    tensors.update(stored)
    return tensors, json.loads(metadata.get(ALIASES_KEY, "{}"))


def load_sparse(model: nn.Module, directory: PathLike) -> None:
    """Load a :func:`save_sparse` checkpoint into ``model`` (dense), bit for bit.

    Every entry of the (unwrapped) model's state dict, parameters and persistent buffers, must
    be in the checkpoint with the same shape and dtype (a tied name may be stored under the name
    it is tied to); nothing is cast. Checks everything before writing anything: ValueError
    naming each parameter whose shape or dtype differs (both given), the names missing from the
    checkpoint and those it has that the model lacks; FileNotFoundError when
    ``directory/config.json`` or ``directory/model.safetensors`` is missing; ImportError naming
    the ``deploy`` extra. Weights are copied in place (their devices kept); DTensor (sharded)
    state is a ValueError.
    """
    _import_extra()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    folder = Path(directory)
    tensors, aliases = _read_tensors(folder, _read_config(folder))
    state = _state_of(unwrap(model)[0])
    missing = [n for n in state if n not in tensors and aliases.get(n) not in tensors]
    unexpected = [n for n in tensors if n not in state]
    wrong = [
        f"'{name}': checkpoint {list(value.shape)} {value.dtype}, "
        f"model {list(state[name].shape)} {state[name].dtype}"
        for name, value in tensors.items()
        if name in state and (value.shape != state[name].shape or value.dtype != state[name].dtype)
    ]
    if missing or unexpected or wrong:
        problems = [f"shape or dtype differs for {'; '.join(wrong)}"] if wrong else []
        problems += [f"missing from the checkpoint: {missing}"] if missing else []
        problems += [f"not in the model: {unexpected}"] if unexpected else []
        raise ValueError(
            f"the checkpoint in {str(folder)!r} does not fit this model: {'. '.join(problems)}"
        )
    with torch.no_grad():
        for name, target in state.items():
            target.copy_(tensors[name] if name in tensors else tensors[aliases[name]])
