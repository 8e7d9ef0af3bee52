"""Model-level API: choose parameters, prune them, keep them pruned through training."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gmp_ext import distributed
from gmp_ext.kernels import ops, primitives
from gmp_ext.kernels.dtensors import local_tensor
from gmp_ext.kernels.engine import PreparedStep, StepPattern
from gmp_ext.kernels.layout import KeyScale
from gmp_ext.model.mask_store import (
    MaskEntry,
    MaskStore,
    drop_store,
    ensure_store,
    find_store,
    get_store,
    inner_stores,
)
from gmp_ext.model.parameters import (
    ParamSpec,
    bare_name,
    named_parameters,
    reduction_dims,
    select_parameters,
    unwrap,
)
from gmp_ext.pruning.strategies import Selection, selection_for
from gmp_ext.scores import Score, ScoreSpec, score_for

__all__ = [
    "AttachHandle",
    "SparsityReport",
    "apply_masks",
    "attach",
    "entries_of",
    "format_table",
    "mask_gradients_hook",
    "masks",
    "optimizer_state_of",
    "prune_parameters",
    "prune_step",
    "remove",
    "sparsity_report",
    "targets_of",
    "zero_pruned_grads",
    "zero_pruned_state",
]

SparsitySpec = Union[float, Mapping[str, float]]


def targets_of(
    model: nn.Module,
    sparsity: SparsitySpec,
    params: ParamSpec,
    exclude: Sequence[str] | str | None,
    selection: Selection,
) -> tuple[dict[str, nn.Parameter], dict[str, float]]:
    """The selected parameters and each one's target, from a sparsity (a number, or a dict
    {name: sparsity} when the strategy takes one target per tensor)."""
    if not isinstance(sparsity, Mapping):
        value = ops.check_sparsity(sparsity)
        selected = select_parameters(model, params, exclude)
        return selected, dict.fromkeys(selected, value)
    if not selection.per_tensor_targets:
        raise ValueError("a per-parameter sparsity dict needs scope='layer'")
    inner, prefix = unwrap(model)
    named = named_parameters(inner)
    targets = {
        bare_name(name, prefix, named): ops.check_sparsity(v, f"sparsity[{name!r}]")
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
    scope: str | Selection = "layer",
    nm: tuple[int, int] | None = None,
    params: ParamSpec = None,
    exclude: Sequence[str] | str | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    score: ScoreSpec = None,
    calibration: Iterable[Any] | None = None,
) -> dict[str, float]:
    """Compute fresh masks from the current weights and zero the pruned weights in place.

    ``scope="layer"`` prunes ``round(sparsity * numel)`` of every selected tensor;
    ``scope="global"`` prunes ``round(sparsity * total)`` of all of them with one threshold;
    ``scope`` may also be a :class:`gmp_ext.pruning.strategies.Selection`. ``nm=(n, m)`` (e.g.
    ``(2, 4)``) prunes only within N:M groups, so that no group of ``m`` consecutive weights of
    a row loses more than ``m - n``: ``sparsity`` may then reach ``1 - n/m``, where the weights
    are exactly n:m sparse (see :class:`gmp_ext.pruning.strategies.NMSelection`).
    ``sparsity`` may be a dict {parameter name: sparsity} (layer scope). Default selection:
    the weight of every Linear, Conv and ConvTranspose module. With ``optimizer``, the pruned
    entries of its state for these parameters are zeroed too (see :func:`zero_pruned_state`).
    ``score`` chooses what is ranked (:mod:`gmp_ext.scores`): ``"magnitude"`` (default, |w|),
    ``"wanda"`` (|w| times input-feature norms: give ``calibration``, an iterable of model
    inputs, or a :class:`gmp_ext.scores.Wanda` attached while the model ran), ``"movement"``
    (``-w * grad``: accumulated by an attached :class:`gmp_ext.scores.Movement`, else the
    gradients present), a Score, or ``f(name, param) -> values``. With ``calibration`` the
    model runs on each item (a tensor, a tuple of positional inputs, or a dict of keyword
    inputs) in eval mode, without gradients, while the score observes it.
    Returns {name: sparsity of the new mask}. On any error nothing is modified.
    """
    if optimizer is not None:
        _check_optimizer(optimizer)
    selection = selection_for(scope, nm)
    chosen = score_for(score)
    selected, targets = targets_of(model, sparsity, params, exclude, selection)
    if calibration is not None:
        _calibrate(model, chosen, list(selected), calibration)
    # Global scope returns how the one count split over the tensors: the masks say.
    count = not selection.per_tensor_targets
    entries, kept = prune_parameters(model, selected, targets, selection, score=chosen, count=count)
    if optimizer is not None:
        get_store(model).apply_to(optimizer_state_of(optimizer), names=entries)  # type: ignore[union-attr]
    if count:
        if kept is None:
            return distributed.mask_sparsities(entries)
        return {  # as MaskEntry.sparsity computes it
            n: 1.0 - c / e.param.numel() if e.param.numel() else 0.0
            for (n, e), c in zip(entries.items(), kept)
        }
    # Each mask prunes exactly its count (the selection's contract): no need to count bits.
    numels = [p.numel() for p in selected.values()]
    counts = selection.counts(numels, [targets[n] for n in selected])
    return {  # as MaskEntry.sparsity computes it, to the last bit
        n: 1.0 - (numel - c) / numel if numel else 0.0
        for n, c, numel in zip(selected, counts, numels)
    }


def _calibrate(
    model: nn.Module, score: Score, names: Sequence[str], batches: Iterable[Any]
) -> None:
    """Run ``model`` on each calibration item, in eval mode (restored after) and without
    gradients, while ``score`` observes."""
    handles = score.attach(model, names)
    if not handles:
        raise ValueError(
            f"calibration= is for scores that observe forward passes; score {score.name!r} "
            "observes none"
        )
    seen = 0
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if not seen:
        raise ValueError("calibration= gave no batches")


def prune_parameters(
    model: nn.Module,
    selected: Mapping[str, nn.Parameter],
    targets: Mapping[str, float],
    selection: Selection,
    inspect: Callable[[Mapping[str, MaskEntry]], None] | None = None,
    score: Score | None = None,
    count: bool = False,
) -> tuple[dict[str, MaskEntry], list[int] | None]:
    """The prune step of parameters already chosen and checked (``selected``, by the model's
    names, each with its target; one target for all when the strategy takes one): fresh masks
    from the current weights, stored and applied. ``inspect(entries)``, when given, sees the
    new entries before the pruned weights are zeroed (the weights the selection ranked);
    without it the mask build zeroes them in its own pass. The store's other masks are
    re-applied too. ``score`` ranks (default |w|); its window is reset after the masks are
    made. Returns the new entries and, with ``count``, the elements each new mask keeps when
    one prepared step made them all (counted in its build or over its jobs' tables; else
    None). Raises ValueError on NaN weights or scores before anything is modified (selection
    runs before any mask is written)."""
    store = ensure_store(model)
    names = list(selected)
    store.resolve(skip=names)
    tensors = [selected[n] for n in names]
    reuse = [store.reusable_mask(n, t) for n, t in zip(names, tensors)]
    steps: list[PreparedStep] = []

    def prepare(
        local: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        scope: str,
        key_space: int,
        pattern: StepPattern,
        ranked: Sequence[torch.Tensor] | None,
        scales: Sequence[KeyScale | None] | None,
    ) -> PreparedStep:
        step = store.prune_step(names, local, masks, scope, key_space, pattern, ranked, scales)
        steps.append(step)
        return step

    new_masks, thresholds = selection.masks(
        names,
        tensors,
        [targets[n] for n in names],
        reuse,
        prepare,
        reduction_dims(unwrap(model)[0], names) if selection.needs_layout else None,
        zero_pruned=inspect is None,
        score=score,
    )
    if score is not None:
        score.reset()
    entries = {
        name: MaskEntry(param, mask, targets[name], threshold)
        for name, param, mask, threshold in zip(names, tensors, new_masks, thresholds)
    }
    others = [e for n, e in store.entries.items() if n not in entries]
    store.set_masks(entries)
    if inspect is not None:
        inspect(entries)
        store.apply()
    elif others:  # the build zeroed this step's weights
        with torch.no_grad():
            primitives.apply_in_place(
                [local_tensor(e.param).detach() for e in others], [e.mask for e in others]
            )
    if distributed.debug_checks_enabled():
        distributed.verify_masks_across_ranks(model)
    # Counted from the step's tables only when it alone wrote these very masks (a selection
    # under caps runs without one).
    if (
        not count
        or len(steps) != 1
        or [m.data_ptr() for m in steps[0].masks] != [m.data_ptr() for m in new_masks]
    ):
        return entries, None
    return entries, steps[0].kept_counts()


def _masked_entries(model: nn.Module) -> list[tuple[MaskStore, dict[str, str]]]:
    """The stores masking ``model``'s parameters, bound to the current parameters, each with
    ``{model's name: the store's name}`` of its entries: the store of ``model`` or of a model
    enclosing it (a submodule of a pruned model: its own parameters), else the stores of its
    submodules (a pruned model inside a larger one: ``nn.Sequential(pruned, head)``)."""
    found = find_store(model)
    if found is not None:
        store, prefix = found
        store.resolve()
        return [(store, {n[len(prefix) :]: n for n in store.entries if n.startswith(prefix)})]
    stores = []
    for store, prefix in inner_stores(model):
        store.resolve()
        stores.append((store, {prefix + n: n for n in store.entries}))
    return stores


def entries_of(model: nn.Module) -> dict[str, MaskEntry]:
    """Every masked parameter of ``model``, by ``model``'s names, bound to the current
    parameters (see :func:`_masked_entries`)."""
    return {
        name: store.entries[held]
        for store, names in _masked_entries(model)
        for name, held in names.items()
    }


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: bool tensor of the weight's shape, True = kept} for every masked parameter of
    ``model`` (a submodule of a pruned model: its own parameters, by their names in it; a model
    holding pruned submodules: theirs, by its names; a DTensor parameter's: a bool DTensor
    sharded like it). Empty when nothing is masked."""
    _check_model(model)
    return {
        name: distributed.keep_flags(entry.param, entry.mask)
        for name, entry in entries_of(model).items()
    }


def apply_masks(model: nn.Module) -> int:
    """Re-zero every pruned weight of the model (a submodule of a pruned model: of its own
    parameters; a model holding pruned submodules, a PEFT model around a pruned one, a model
    ``merge_and_unload`` returned: all of them, which restores the exact sparsity a LoRA merge
    filled in). Returns the number of parameters re-zeroed (0 when nothing is masked)."""
    _check_model(model)
    count = 0
    for store, names in _masked_entries(model):
        if len(names) == len(store.entries):
            store.apply()  # the cached fused apply
        elif names:
            entries = [store.entries[n] for n in names.values()]
            with torch.no_grad():
                primitives.apply_in_place(
                    [local_tensor(e.param).detach() for e in entries], [e.mask for e in entries]
                )
        count += len(names)
    return count


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


def optimizer_state_of(optimizer: torch.optim.Optimizer) -> Callable[[MaskEntry], Iterable[object]]:
    """The optimizer's state tensors of an entry's parameter, never creating a state (``state``
    is a defaultdict) and never the step counter."""

    def tensors(entry: MaskEntry) -> Iterable[object]:
        state = optimizer.state.get(entry.param)
        return [] if state is None else [v for k, v in state.items() if k != "step"]

    return tensors


def _grad_of(entry: MaskEntry) -> Iterable[object]:
    grad = entry.param.grad
    return [] if grad is None else [grad]


def mask_gradients_hook(store: MaskStore) -> Callable[..., None]:
    """An optimizer step pre-hook zeroing the gradients of the store's pruned weights (a
    sparse COO gradient's stored values in place, so e.g. SparseAdam sees them masked); a
    gradient it cannot mask exactly fails the step before anything is modified."""

    def hook(_optimizer: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
        store.apply_to(_grad_of, required="gradient")

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
    return _apply_to_masked(model, optimizer_state_of(optimizer))


def zero_pruned_grads(model: nn.Module) -> int:
    """Zero the ``.grad`` entries of the model's pruned weights (parameters without a gradient
    are skipped), e.g. before ``clip_grad_norm_`` so that the norm counts only kept weights.
    A sparse COO gradient (``nn.Embedding(sparse=True)``) keeps its indices, its stored values
    of pruned weights are zeroed. Returns the number of gradients masked. A gradient that
    cannot be masked exactly (another sparse layout, a sparse gradient of a DTensor, an
    expanded one) is a ValueError naming the parameter, and no gradient is modified."""
    _check_model(model)
    return sum(
        store.apply_to(_grad_of, list(names.values()), required="gradient")
        for store, names in _masked_entries(model)
    )


def _apply_to_masked(model: nn.Module, tensors_of: Callable[[MaskEntry], Iterable[object]]) -> int:
    return sum(
        store.apply_to(tensors_of, names=list(names.values()))
        for store, names in _masked_entries(model)
    )


class AttachHandle:
    """The hooks :func:`attach` registered: ``remove()`` removes them all (as does
    ``gmp_ext.remove(model)``); also a context manager that removes them on exit."""

    def __init__(self, *handles: RemovableHandle) -> None:
        self.handles: tuple[RemovableHandle, ...] = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = ()

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

    Attaching the same model to the same optimizer again replaces the earlier hooks (never
    two sets). Raises ValueError when a :class:`gmp_ext.GMP` controller already drives this
    model with this optimizer (it re-applies the masks itself). A model holding pruned
    submodules (``nn.Sequential(pruned, head)``) attaches each of them.

    Returns an :class:`AttachHandle` whose ``remove()`` removes the hooks; ``remove(model)``
    also removes them.
    """
    _check_model(model)
    _check_optimizer(optimizer)
    _check_flag(mask_gradients, "mask_gradients")
    if find_store(model) is None:
        # A model around pruned submodules (a PEFT model's base is its own): attach theirs.
        held = [s.model() for s, _ in inner_stores(model) if s.model is not None]
        inner = [m for m in held if m is not None]
        if inner:
            each = [attach(m, optimizer, mask_gradients=mask_gradients) for m in inner]
            return AttachHandle(*(handle for one in each for handle in one.handles))
    store = ensure_store(model)
    controller = None if store.controller is None else store.controller()
    if controller is not None and getattr(controller, "optimizer", None) is optimizer:
        raise ValueError(
            "a GMP controller already re-applies this model's masks after every step of this "
            "optimizer; attach() is not needed (call gmp.remove() first to use attach alone)"
        )
    previous = store.attachments.pop(id(optimizer), None)
    if isinstance(previous, AttachHandle):
        previous.remove()
    handles = []
    if mask_gradients:
        handles.append(optimizer.register_step_pre_hook(mask_gradients_hook(store)))
    handles.append(optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: store.apply()))
    store.hooks.extend(handles)
    handle = store.attachments[id(optimizer)] = AttachHandle(*handles)
    return handle


def remove(model: nn.Module) -> int:
    """Drop the model's masks and hooks (a model holding pruned submodules: theirs); the
    weights stay as they are. Returns the number of masks dropped. Raises ValueError for a
    submodule of a pruned model: its masks belong to that model's, which ``remove`` drops."""
    _check_model(model)
    found = find_store(model)
    if found is not None and found[1]:
        raise ValueError(
            f"this module is '{found[1][:-1]}' of a model whose masks gmp_ext holds; call "
            "gmp_ext.remove on that model (or prune it with exclude= to leave this module out)"
        )
    stores = [found[0]] if found is not None else [s for s, _ in inner_stores(model)]
    for store in stores:
        held = None if store.model is None else store.model()
        if held is not None:
            drop_store(held)
        store.remove_hooks()
    return sum(len(store.entries) for store in stores)


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
        return format_table(header, lines)


def format_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell: the first two (name, shape) left-aligned, the
    numbers right-aligned."""
    rows = [header, *lines]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row) for row in rows)


def sparsity_report(
    model: nn.Module, params: ParamSpec = None, exclude: Sequence[str] | str | None = None
) -> SparsityReport:
    """Per-parameter zeros, counted in the weights: of the model's masked parameters (a
    submodule of a pruned model: of its own), or of :func:`select_parameters`' selection when
    nothing is masked or ``params``/``exclude`` is given (its errors included)."""
    entries = entries_of(_check_model(model))
    if entries and params is None and exclude is None:
        chosen = {name: e.param for name, e in entries.items()}
    else:
        chosen = select_parameters(model, params, exclude)
    zeros = distributed.zero_counts(list(chosen.values()))
    rows = tuple(
        SparsityRow(name, tuple(p.shape), p.numel(), z)
        for (name, p), z in zip(chosen.items(), zeros)
    )
    return SparsityReport(rows)
