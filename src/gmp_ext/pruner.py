"""Model-level API: choose parameters, prune them, keep them pruned through training."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import distributed, ops
from .masks import MaskEntry, MaskStore, drop_store, get_store

__all__ = [
    "DEFAULT_PRUNABLE",
    "AttachHandle",
    "SparsityReport",
    "apply_masks",
    "attach",
    "masks",
    "prune_step",
    "remove",
    "select_parameters",
    "sparsity_report",
    "zero_pruned_grads",
    "zero_pruned_state",
]

# Weight matrices and kernels; never biases, norms or embeddings.
DEFAULT_PRUNABLE: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

ParamSpec = Union[
    None,
    Sequence[str],
    Sequence[tuple[nn.Module, str]],
    Callable[[str, nn.Parameter], bool],
]
SparsitySpec = Union[float, Mapping[str, float]]


def _matches(pattern: str, name: str) -> bool:
    return pattern == name or re.fullmatch(pattern, name) is not None


def _named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


def _bare(name: str, prefix: str, named: Mapping[str, nn.Parameter]) -> str:
    """A name given for a wrapped model (DDP's ``module.x``) as the user's model names it."""
    if prefix and name.startswith(prefix) and name not in named:
        return name[len(prefix) :]
    return name


def _default_selection(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    chosen = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(module, DEFAULT_PRUNABLE) and isinstance(weight, nn.Parameter):
            chosen.append((f"{module_name}.weight" if module_name else "weight", weight))
    return chosen


def _from_spec(model: nn.Module, params: ParamSpec) -> list[tuple[str, nn.Parameter]]:
    named = _named_params(model)
    if params is None:
        return _default_selection(model)
    if callable(params):
        return [(n, p) for n, p in named.items() if params(n, p)]
    if isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
        raise TypeError(
            "params must be None, a list of parameter names, a list of (module, name) pairs "
            f"or a predicate (name, param) -> bool, got {params!r}"
        )
    module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    chosen = []
    for item in params:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"params entry {item!r} names no parameter of the model")
            chosen.append((item, named[item]))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], nn.Module):
            module, attr = item
            if id(module) not in module_names:
                raise ValueError(
                    f"params entry ({type(module).__name__}, {attr!r}): "
                    "the module is not part of the model"
                )
            param = getattr(module, attr, None)
            if not isinstance(param, nn.Parameter):
                raise ValueError(
                    f"params entry ({type(module).__name__}, {attr!r}) names no parameter"
                )
            prefix = module_names[id(module)]
            chosen.append((f"{prefix}.{attr}" if prefix else attr, param))
        else:
            raise TypeError(f"params entries must be names or (module, name) pairs, got {item!r}")
    return chosen


def select_parameters(
    model: nn.Module, params: ParamSpec = None, exclude: Sequence[str] | str | None = None
) -> dict[str, nn.Parameter]:
    """The parameters gmp_ext prunes, by name, each tensor once (tied weights: first name)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # A DDP-wrapped model is pruned under the names of the model it wraps; names and patterns
    # may carry the wrapper's "module." prefix or not.
    model, prefix = distributed.unwrap(model)
    if (
        not callable(params)
        and isinstance(params, Iterable)
        and not isinstance(params, (str, bytes))
    ):
        named = _named_params(model)
        params = [_bare(p, prefix, named) if isinstance(p, str) else p for p in params]
    chosen = _from_spec(model, params)
    patterns = [exclude] if isinstance(exclude, str) else list(exclude or [])

    def excluded(pattern: str, name: str) -> bool:
        return _matches(pattern, name) or (bool(prefix) and _matches(pattern, prefix + name))

    for pattern in patterns:
        if not any(excluded(pattern, name) for name, _ in chosen):
            warnings.warn(f"exclude entry {pattern!r} matches no selected parameter", stacklevel=3)
    selected: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, param in chosen:
        if any(excluded(p, name) for p in patterns) or id(param) in seen:
            continue
        seen.add(id(param))
        selected[name] = param
    if not selected:
        raise ValueError(
            "no prunable parameter selected: the model has no nn.Linear/nn.Conv*/"
            "nn.ConvTranspose* weight left after `exclude`; pass `params=` to choose some"
        )
    for name, param in selected.items():
        ops._check_tensor(param, f"parameter '{name}'")
        if not param.is_floating_point():
            raise TypeError(f"parameter '{name}' is not floating point ({param.dtype})")
    return selected


def _targets(
    model: nn.Module, sparsity: SparsitySpec, params: ParamSpec, exclude, scope: str
) -> tuple[dict[str, nn.Parameter], dict[str, float]]:
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if not isinstance(sparsity, Mapping):
        value = ops.check_sparsity(sparsity)
        selected = select_parameters(model, params, exclude)
        return selected, dict.fromkeys(selected, value)
    if scope == "global":
        raise ValueError("a per-parameter sparsity dict needs scope='layer'")
    inner, prefix = distributed.unwrap(model)
    named = _named_params(inner)
    targets = {
        _bare(name, prefix, named): ops.check_sparsity(v, f"sparsity[{name!r}]")
        for name, v in sparsity.items()
    }
    if params is None and exclude is None:
        unknown = [name for name in targets if name not in named]
        if unknown:
            raise ValueError(f"sparsity names no parameter of the model: {unknown}")
        selected = select_parameters(model, list(targets))
    else:
        selected = select_parameters(model, params, exclude)
    missing = sorted(set(selected) - set(targets))
    extra = sorted(set(targets) - set(selected))
    if missing or extra:
        raise ValueError(
            "the sparsity dict must name exactly the selected parameters: "
            f"missing {missing}, not selected {extra}"
        )
    return selected, {name: targets[name] for name in selected}


def prune_step(
    model: nn.Module,
    sparsity: SparsitySpec,
    *,
    scope: str = "layer",
    params: ParamSpec = None,
    exclude: Sequence[str] | str | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """Compute fresh masks from the current weights and zero the pruned weights in place.

    ``scope="layer"`` prunes ``round(sparsity * numel)`` of every selected tensor;
    ``scope="global"`` prunes ``round(sparsity * total)`` of all of them with one threshold.
    ``sparsity`` may be a dict {parameter name: sparsity} (layer scope). Default selection:
    the weight of every Linear, Conv and ConvTranspose module. With ``optimizer``, the pruned
    entries of its state for these parameters are zeroed too (see :func:`zero_pruned_state`).
    Returns {name: sparsity of the new mask}. On any error nothing is modified.
    """
    if optimizer is not None:
        _check_optimizer(optimizer)
    selected, targets = _targets(model, sparsity, params, exclude, scope)
    names = list(selected)
    tensors = [selected[n] for n in names]
    labels = [f"parameter '{n}'" for n in names]
    if scope == "layer":
        ks = [ops.prune_count(t.numel(), targets[n]) for n, t in zip(names, tensors)]
        rows = ops._select_rows_layerwise(tensors, labels, ks)
    else:
        total = sum(t.numel() for t in tensors)
        rows = ops._select_rows_global(tensors, labels, ops.prune_count(total, targets[names[0]]))
    # Nothing can fail from here on: the new masks may overwrite the old ones in place.
    store = get_store(model, create=True)
    reuse = [store.reusable_mask(n, t) for n, t in zip(names, tensors)]
    wide64 = ops._wide64(tensors) if scope == "global" else None
    new_masks = ops._build(tensors, rows, wide64, reuse)
    thresholds = ops._thresholds(rows, tensors, [1] * len(tensors))
    entries = {
        name: MaskEntry(param, mask, targets[name], th.value)
        for name, param, mask, th in zip(names, tensors, new_masks, thresholds)
    }
    store.set_masks(entries)
    store.apply()
    if optimizer is not None:
        store.apply_to(_state_of(optimizer), names=entries)
    if distributed.debug_checks_enabled():
        distributed.verify_masks_across_ranks(model)
    return distributed.mask_sparsities(entries)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: bool tensor of the weight's shape, True = kept} for every masked parameter (a
    DTensor parameter's: a bool DTensor sharded like it)."""
    store = get_store(model)
    if store is None:
        return {}
    return {
        name: distributed.keep_flags(entry.param, entry.mask)
        for name, entry in store.entries.items()
    }


def apply_masks(model: nn.Module) -> None:
    """Re-zero every pruned weight of the model (a no-op before the first prune_step)."""
    store = get_store(model)
    if store is not None:
        store.apply()


def _check_optimizer(optimizer: object) -> torch.optim.Optimizer:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    return optimizer


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _state_of(optimizer: torch.optim.Optimizer) -> Callable[[MaskEntry], Iterable[object]]:
    """The optimizer's state tensors of an entry's parameter, never creating a state (``state``
    is a defaultdict) and never the step counter."""

    def tensors(entry: MaskEntry) -> Iterable[object]:
        state = optimizer.state.get(entry.param)
        return [] if state is None else [v for k, v in state.items() if k != "step"]

    return tensors


def _grad_of(entry: MaskEntry) -> Iterable[object]:
    grad = entry.param.grad
    return [] if grad is None else [grad]


def _mask_grads_hook(store: MaskStore) -> Callable[..., None]:
    """An optimizer step pre-hook zeroing the gradients of the store's pruned weights."""

    def hook(_optimizer: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
        store.apply_to(_grad_of)

    return hook


def zero_pruned_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Zero, in every tensor of ``optimizer``'s state shaped like a masked parameter of
    ``model`` (SGD's ``momentum_buffer``; Adam's ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``; RMSprop's ``square_avg``; Adagrad's ``sum``; ...), the entries of the
    pruned weights: one fused call per device.

    The ``step`` counter (even of a 0-dim parameter), tensors of another shape or dtype
    (factored second moments, integer buffers) and parameters with no state yet are left
    alone; a DTensor parameter's state is masked shard by shard. Kept entries are untouched,
    so the kept weights train exactly as they would have. Returns the number of state tensors
    masked (0 before the first ``prune_step``).
    """
    _check_model(model)
    _check_optimizer(optimizer)
    store = get_store(model)
    return 0 if store is None else store.apply_to(_state_of(optimizer))


def zero_pruned_grads(model: nn.Module) -> int:
    """Zero the ``.grad`` entries of the model's pruned weights (parameters without a gradient
    are skipped), e.g. before ``clip_grad_norm_`` so that the norm counts only kept weights.
    Returns the number of gradients masked."""
    _check_model(model)
    store = get_store(model)
    return 0 if store is None else store.apply_to(_grad_of)


class AttachHandle:
    """The hooks :func:`attach` registered: ``remove()`` removes them all (as does
    ``gmp_ext.remove(model)``); also a context manager that removes them on exit."""

    def __init__(self, *handles: RemovableHandle) -> None:
        self.handles: tuple[RemovableHandle, ...] = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.remove()


def attach(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, mask_gradients: bool = False
) -> AttachHandle:
    """Re-apply the model's masks after every ``optimizer.step()`` (a step post-hook).

    With ``mask_gradients=True`` a step pre-hook also zeroes the ``.grad`` entries of the
    pruned weights before every step, so they add nothing to the optimizer state (momentum,
    Adam moments): after :func:`zero_pruned_state` that state stays zero for pruned weights.
    The kept weights train exactly as without it.

    Returns an :class:`AttachHandle` whose ``remove()`` removes the hooks; ``remove(model)``
    also removes them.
    """
    _check_model(model)
    _check_optimizer(optimizer)
    _check_flag(mask_gradients, "mask_gradients")
    store = get_store(model, create=True)
    handles = []
    if mask_gradients:
        handles.append(optimizer.register_step_pre_hook(_mask_grads_hook(store)))
    handles.append(optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: store.apply()))
    store.hooks.extend(handles)
    return AttachHandle(*handles)


def remove(model: nn.Module) -> None:
    """Drop the model's masks and hooks; the weights stay as they are."""
    store = drop_store(model)
    if store is not None:
        store.remove_hooks()


@dataclass(frozen=True)
class SparsityRow:
    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Zeros per parameter (counted in the weights, not taken from masks) and in total."""

    rows: tuple[SparsityRow, ...]

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.rows)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def as_dict(self) -> dict[str, float]:
        return {r.name: r.sparsity for r in self.rows}

    def __str__(self) -> str:
        header = ("name", "shape", "numel", "zeros", "sparsity")
        lines = [
            (r.name, "x".join(map(str, r.shape)), str(r.numel), str(r.zeros), f"{r.sparsity:.4f}")
            for r in self.rows
        ]
        lines.append(("total", "", str(self.numel), str(self.zeros), f"{self.sparsity:.4f}"))
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(5)]
        fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
        return "\n".join(fmt.format(*row) for row in [header, *lines])


def sparsity_report(
    model: nn.Module, params: ParamSpec = None, exclude: Sequence[str] | str | None = None
) -> SparsityReport:
    """Per-parameter zeros of the masked parameters (or of the default selection)."""
    store = get_store(model)
    if store is not None and store.entries and params is None and exclude is None:
        chosen = {name: e.param for name, e in store.entries.items()}
    else:
        chosen = select_parameters(model, params, exclude)
    zeros = distributed.zero_counts(list(chosen.values()))
    rows = tuple(
        SparsityRow(name, tuple(p.shape), p.numel(), z)
        for (name, p), z in zip(chosen.items(), zeros)
    )
    return SparsityReport(rows)
