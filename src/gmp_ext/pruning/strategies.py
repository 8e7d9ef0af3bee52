"""Selection strategies: which elements of a list of tensors a prune step removes.

``scope="layer"`` and ``scope="global"`` are shorthands for :class:`LayerSelection` and
:class:`GlobalSelection`; ``nm=(n, m)`` makes an :class:`NMSelection`. A strategy turns
targets into counts, selects (eagerly, for single-process or sharded tensors alike) and builds
masks; prepared jobs (:class:`gmp_ext.PrunePlan`) read its ``scope``, ``pattern``, ``counts``
and ``key_space``, and run its :class:`gmp_ext.kernels.engine.StepPattern` (how ranked values become
masks: every element, or N:M candidate lists). What is ranked is a score's
(:mod:`gmp_ext.scores`): |w| by default, ranked in place. A new pattern is a new strategy with
its step pattern: callers hold a strategy, never a scope string.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch

from gmp_ext import distributed
from gmp_ext.kernels import library, ops, primitives
from gmp_ext.kernels.backends import Backend, Job
from gmp_ext.kernels.dtensors import any_dtensor, local_tensor
from gmp_ext.kernels.engine import UNSTRUCTURED, PreparedStep, StepPattern
from gmp_ext.kernels.layout import KEY_SPACE_NATIVE, KeyScale, key_space_for, valid_nm
from gmp_ext.model.layers import reduction_last, restore_layout
from gmp_ext.scores import Ranked, Scaled, Score, rank_tensors

__all__ = [
    "GlobalSelection",
    "LayerSelection",
    "NMPattern",
    "NMSelection",
    "Selection",
    "check_nm",
    "register_selection",
    "select_rows_global",
    "select_rows_layerwise",
    "selection_for",
    "selection_from_dict",
]


def select_rows_layerwise(
    tensors: Sequence[torch.Tensor], labels: Sequence[str], ks: Sequence[int]
) -> list[torch.Tensor]:
    """Selection rows (``csrc/common/tensor_table.h``) where tensor i prunes ``ks[i]``
    elements; a DTensor's are rows of its local shard, selected together across its mesh (a
    collective). Raises ValueError naming the tensor on NaN, before anything is modified."""
    if any_dtensor(tensors):
        return distributed.select_layerwise_sharded(tensors, labels, ks)
    return primitives.select_rows_layerwise(tensors, labels, ks)


def select_rows_global(
    tensors: Sequence[torch.Tensor], labels: Sequence[str], k: int
) -> list[torch.Tensor]:
    """Rows of one selection of the ``k`` smallest elements over all tensors (ties: tensor
    position, then flat index); sharded tensors are selected across their mesh."""
    if any_dtensor(tensors):
        return distributed.select_global_sharded(tensors, labels, k)
    return primitives.select_rows_global(tensors, labels, k)


# Makes (or reuses) the prepared step of (tensors, masks, scope, key space, step pattern,
# ranked tensors or None, scales or None).
Prepare = Callable[
    [
        Sequence[torch.Tensor],
        Sequence[torch.Tensor],
        str,
        int,
        StepPattern,
        "Sequence[torch.Tensor] | None",
        "Sequence[KeyScale | None] | None",
    ],
    PreparedStep,
]
# What a score gives the kernels (gmp_ext.scores.rank_tensors): tensors, factors of |w|, or
# None for |w| in place.
Scored = Optional[Union[Ranked, Scaled]]


_SELECTIONS: dict[str, type[Selection]] = {}


def register_selection(cls: type[Selection]) -> type[Selection]:
    """Class decorator: checkpoints naming ``cls.name`` (``to_dict``) make ``cls`` again."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute 'name' to be registered")
    _SELECTIONS[cls.name] = cls
    return cls


class Selection:
    """The base of every strategy; subclasses set ``scope`` (the kind of backend job that
    selects for them), ``per_tensor_targets`` and, for a structured pattern, ``pattern`` and
    ``needs_layout``."""

    scope: str
    per_tensor_targets: bool  # one target per tensor, or one for all of them
    pattern: StepPattern = UNSTRUCTURED  # how the prepared step turns ranks into masks
    needs_layout = False  # whether masks() needs each tensor's reduction dimension
    name = ""  # registered name (checkpoints): see register_selection

    def params(self) -> dict[str, object]:
        """Constructor arguments, builtins only (``to_dict`` round-trips through them)."""
        return {}

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, **self.params()}

    def counts(self, numels: Sequence[int], targets: Sequence[float]) -> list[int]:
        """The counts a job prunes: one per tensor, or one for all."""
        raise NotImplementedError

    def key_space(self, dtypes: set[torch.dtype]) -> int:
        return KEY_SPACE_NATIVE

    def check(self, tensors: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> None:
        """ValueError when the tensors (parameters ``names``) cannot be selected together,
        before any work."""

    def rows(
        self, tensors: Sequence[torch.Tensor], labels: Sequence[str], counts: Sequence[int]
    ) -> list[torch.Tensor]:
        raise NotImplementedError

    def masks(
        self,
        names: Sequence[str],
        tensors: Sequence[torch.Tensor],
        targets: Sequence[float],
        reuse: Sequence[torch.Tensor | None] | None = None,
        prepare: Prepare | None = None,
        reduction_dims: Sequence[int] | None = None,
        zero_pruned: bool = False,
        score: Score | None = None,
    ) -> tuple[list[torch.Tensor], list[float]]:
        """Fresh masks from the current weights (written over ``reuse[i]`` when given) and the
        threshold of each (|w|, or with ``score`` the score's value at the cut); ValueError
        naming the tensor on NaN weights or scores, before any mask is written. With
        ``prepare`` (a source of prepared steps that keeps them for reuse), the single-
        process selection runs as a prepared step, whose tables a repeated prune step
        reuses. ``reduction_dims`` (each tensor's input dimension, see
        :func:`gmp_ext.model.parameters.reduction_dims`) matters to structured patterns only.
        ``zero_pruned`` also zeroes the pruned elements, in the mask build's own pass where
        the kernels can (after the NaN check: nothing is modified on error)."""
        self.check(tensors, names)
        counts = self.counts([t.numel() for t in tensors], targets)
        scored = self.scored(score, names, tensors, counts)
        return self.masks_with(names, tensors, counts, reuse, prepare, zero_pruned, scored)

    def scored(
        self,
        score: Score | None,
        names: Sequence[str],
        tensors: Sequence[torch.Tensor],
        counts: Sequence[int],
    ) -> Scored:
        """The score's tensors for the kernels (None: |w| in place), checked."""
        if score is None or score.in_place:
            return None
        if any_dtensor(tensors):
            raise NotImplementedError(
                f"score {score.name!r} does not take sharded (DTensor) parameters yet; prune "
                "them by magnitude"
            )
        return rank_tensors(score, names, tensors, counts, self.per_tensor_targets)

    def masks_with(
        self,
        names: Sequence[str],
        tensors: Sequence[torch.Tensor],
        counts: Sequence[int],
        reuse: Sequence[torch.Tensor | None] | None,
        prepare: Prepare | None,
        zero_pruned: bool,
        scored: Scored,
    ) -> tuple[list[torch.Tensor], list[float]]:
        """:meth:`masks` for counts and score tensors already known."""
        if prepare is not None and self.preparable(tensors):
            return self._prepared_masks(names, tensors, counts, reuse, prepare, zero_pruned, scored)
        masks, thresholds = self.masks_for_counts(names, tensors, counts, reuse, scored)
        if zero_pruned:
            _zero_pruned(tensors, masks)
        return masks, thresholds

    def preparable(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether one prepared step can select these tensors (sharded ones need collectives
        between passes)."""
        return not any_dtensor(tensors)

    def _prepared_masks(
        self,
        names: Sequence[str],
        tensors: Sequence[torch.Tensor],
        counts: Sequence[int],
        reuse: Sequence[torch.Tensor | None] | None,
        prepare: Prepare,
        zero_pruned: bool = False,
        scored: Scored = None,
    ) -> tuple[list[torch.Tensor], list[float]]:
        local = [t.detach() for t in tensors]
        masks = [
            given
            if reuse is not None and (given := reuse[i]) is not None
            else primitives.new_mask(t)
            for i, t in enumerate(local)
        ]
        ranked = scored.ranked if isinstance(scored, Ranked) else None
        scales = scored.scales if isinstance(scored, Scaled) else None
        dtypes = {t.dtype for t in (local if ranked is None else ranked)}
        if scales is not None:  # scaled keys are float32 products
            dtypes.add(torch.float32)
        key_space = self.key_space(dtypes)
        step = prepare(local, masks, self.scope, key_space, self.pattern, ranked, scales)
        step.set_counts(counts, self.per_tensor_targets)
        step.run(build=False, apply=False)
        labels = [f"parameter '{n}'" for n in names]
        nan_counts = step.nan_counts()
        if isinstance(scored, Scaled) and any(nan_counts):  # products, not the weights
            scored.raise_on_nan(step.ranked_values(), labels)
        primitives.raise_on_nan_counts(nan_counts, local, labels)  # one read per group
        # The select's staged copies still hold the tensors; a build that also applies zeroes
        # the pruned elements in its own pass (the fused build).
        step.run(select=False, apply=zero_pruned, restage=False)
        if isinstance(scored, Ranked) and scored.mapped:  # signed values
            return masks, scored.cuts(step.rows(), self.per_tensor_targets)
        return masks, step.thresholds()

    def masks_for_counts(
        self,
        names: Sequence[str],
        tensors: Sequence[torch.Tensor],
        counts: Sequence[int],
        reuse: Sequence[torch.Tensor | None] | None = None,
        scored: Scored = None,
    ) -> tuple[list[torch.Tensor], list[float]]:
        """:meth:`masks` for counts (and score tensors) already known; the masks are built from
        what is ranked, nothing is zeroed."""
        if isinstance(scored, Scaled):  # ranked as tensors here (the reference backend's path)
            values = scored.weighted(tensors)
            scored.raise_on_nan(values, [f"parameter '{n}'" for n in names])
            scored = Ranked(values, values, None)
        ranked = list(tensors) if scored is None else scored.ranked
        rows = self.rows(ranked, [f"parameter '{n}'" for n in names], counts)
        reference = primitives.uses_reference(self.key_space({t.dtype for t in ranked}))
        masks = primitives.build(ranked, rows, [reference] * len(ranked), reuse)
        if scored is not None and scored.mapped:
            return masks, scored.cuts(rows, self.per_tensor_targets)
        # In global scope every tensor's threshold is the cut over all of them.
        thresholds = primitives.thresholds(rows, ranked, [1] * len(ranked))
        return masks, [th.value for th in thresholds]

    def expected_zeros(self, numels: Sequence[int], targets: Sequence[float]) -> list[int]:
        """The zeros an update leaves: per tensor, or one total."""
        return self.counts(numels, targets)


@register_selection
class LayerSelection(Selection):
    """``round(target * numel)`` of every tensor, each by its own threshold."""

    name = "layer"
    scope = "layer"
    per_tensor_targets = True

    def counts(self, numels: Sequence[int], targets: Sequence[float]) -> list[int]:
        return [ops.prune_count(n, t) for n, t in zip(numels, targets)]

    def rows(
        self, tensors: Sequence[torch.Tensor], labels: Sequence[str], counts: Sequence[int]
    ) -> list[torch.Tensor]:
        return select_rows_layerwise(tensors, labels, counts)


@register_selection
class GlobalSelection(Selection):
    """``round(target * total)`` of all tensors together, by one threshold (ties: tensor
    position, then flat index), on one device.

    ``caps`` ({name: count}) keeps a tensor from pruning more than its count: every tensor
    above its cap is fixed at its cap and the selection is re-run over the rest with the
    budget reduced by what the fixed ones prune, until no cap is violated. Fixing a tensor only
    raises the others' threshold, so a tensor over its cap stays over it: the result is one
    threshold over the uncapped tensors and exactly ``round(target * total)`` pruned in all,
    unless the caps leave too little room.
    """

    name = "global"
    scope = "global"
    per_tensor_targets = False

    def __init__(self, caps: Mapping[str, int] | None = None) -> None:
        self.caps = dict(caps or {})

    def params(self) -> dict[str, object]:
        return {"caps": dict(self.caps)} if self.caps else {}

    def counts(self, numels: Sequence[int], targets: Sequence[float]) -> list[int]:
        return [ops.prune_count(sum(numels), targets[0])] if numels else [0]

    def key_space(self, dtypes: set[torch.dtype]) -> int:
        return key_space_for(dtypes)

    def check(self, tensors: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> None:
        primitives.check_one_device(tensors)

    def rows(
        self, tensors: Sequence[torch.Tensor], labels: Sequence[str], counts: Sequence[int]
    ) -> list[torch.Tensor]:
        return select_rows_global(tensors, labels, counts[0])

    def masks(
        self,
        names: Sequence[str],
        tensors: Sequence[torch.Tensor],
        targets: Sequence[float],
        reuse: Sequence[torch.Tensor | None] | None = None,
        prepare: Prepare | None = None,
        reduction_dims: Sequence[int] | None = None,
        zero_pruned: bool = False,
        score: Score | None = None,
    ) -> tuple[list[torch.Tensor], list[float]]:
        if not self.caps:
            return super().masks(names, tensors, targets, reuse, prepare, None, zero_pruned, score)
        if score is not None and not score.in_place:
            raise NotImplementedError(
                f"max_sparsity caps rank by magnitude only; score {score.name!r} needs them "
                "left out (or scope='layer' with layer_sparsity)"
            )
        k = self.counts([t.numel() for t in tensors], targets)[0]
        by_name = dict(zip(names, tensors))
        result: dict[str, tuple[torch.Tensor, float]] = {}
        free: list[str] = list(names)
        fixed: list[str] = []
        while free:
            members = [by_name[n] for n in free]
            budget = min(k - sum(self.caps[n] for n in fixed), sum(t.numel() for t in members))
            masks, thresholds = self.masks_for_counts(free, members, [budget])
            kept = distributed.kept_counts(members, masks)
            over = [
                n
                for n, t, c in zip(free, members, kept)
                if n in self.caps and t.numel() - c > self.caps[n]
            ]
            if not over:
                result.update(zip(free, zip(masks, thresholds)))
                break
            fixed += over
            free = [n for n in free if n not in over]
        if fixed:
            members = [by_name[n] for n in fixed]
            ks = [self.caps[n] for n in fixed]
            rows = select_rows_layerwise(members, [f"parameter '{n}'" for n in fixed], ks)
            thresholds = [th.value for th in primitives.thresholds(rows, members, ks)]
            result.update(zip(fixed, zip(primitives.build(members, rows), thresholds)))
        masks = [result[n][0] for n in names]
        if zero_pruned:
            _zero_pruned(tensors, masks)
        return masks, [result[n][1] for n in names]


def _zero_pruned(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """Zero the elements ``masks`` prune (a DTensor: in its local shard)."""
    with torch.no_grad():
        primitives.apply_in_place([local_tensor(t).detach() for t in tensors], masks)


def check_nm(nm: object) -> tuple[int, int]:
    """``nm`` as ``(n, m)``: ValueError unless ``m`` is a power of two from 2 to 32 (the
    patterns of sparse hardware and the literature: 1:2, 2:4, 4:8, 8:16, 16:32, ...) and
    ``1 <= n < m``."""
    if (
        not isinstance(nm, Sequence)
        or isinstance(nm, str)
        or len(nm) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in nm)
    ):
        raise ValueError(f"nm must be a pair of integers (n, m), e.g. (2, 4), got {nm!r}")
    n, m = int(nm[0]), int(nm[1])
    if not valid_nm(n, m):
        raise ValueError(
            "nm=(n, m) needs m a power of two from 2 to 32 and 1 <= n < m (n of every m "
            f"consecutive weights kept), got {nm!r}"
        )
    return n, m


@dataclass(frozen=True)
class NMPattern(StepPattern):
    """The prepared step of an N:M selection (``csrc/common/nm.h``): select writes each ranked
    tensor's candidate list (its ``m - n`` smallest of every ``m``, the ``n`` largest
    protected) into buffers kept with the step and ranks the lists; build keeps the protected
    elements and the candidates above the cut. Selection rows index positions in the lists."""

    n: int
    m: int
    fusable = False
    exact_nan_counts = False  # a group lists at most one NaN

    def prepare(
        self,
        backend: Backend,
        ranked: Sequence[torch.Tensor],
        scope: str | None,
        key_space: int,
        scales: Sequence[KeyScale | None] | None = None,
    ) -> Job:
        # A scaled tensor lists its keys: float32 products, whatever the weight's dtype.
        scaled = scales or [None] * len(ranked)
        lists = [
            t.new_empty(
                t.numel() // self.m * (self.m - self.n),
                dtype=t.dtype if s is None else torch.float32,
            )
            for t, s in zip(ranked, scaled)
        ]
        return backend.prepare(lists, None, scope, key_space)

    def select(self, backend: Backend, source: Job, lists: Job | None) -> None:
        assert lists is not None
        backend.nm_gather(source, lists, (self.n, self.m))
        backend.select(lists)

    def build(self, backend: Backend, source: Job, lists: Job | None) -> None:
        assert lists is not None
        backend.nm_build(source, lists.rows, (self.n, self.m))

    def select_operators(
        self,
        ranked: Sequence[torch.Tensor],
        lists: Job | None,
        counts: torch.Tensor,
        scope: str | None,
        key_space: int,
    ) -> torch.Tensor:
        assert lists is not None
        library.nm_gather(ranked, lists.tensors, self.n, self.m)
        return super().select_operators(lists.tensors, None, counts, scope, key_space)

    def build_operators(
        self,
        ranked: Sequence[torch.Tensor],
        rows: torch.Tensor,
        masks: Sequence[torch.Tensor],
        wide64: bool,
    ) -> None:
        library.nm_build_masks(ranked, rows, masks, self.n, self.m, wide64=wide64)


@register_selection
class NMSelection(Selection):
    """N:M sparsity (``n`` of every ``m`` consecutive weights along the reduction dimension
    kept), reached gradually.

    Groups are ``m`` consecutive elements along each weight's reduction (input) dimension, the
    one 2:4 sparse tensor cores need: ``in_features`` of a Linear, dimension 0 of transformers'
    ``Conv1D`` (``[in, out]``), the input channels at each kernel position of a ConvNd, the
    input channels (dimension 0) of a ConvTranspose, the embedding input of
    ``nn.MultiheadAttention``'s projections (see :mod:`gmp_ext.model.layers`; a tensor of unknown
    layout is taken as ``[out, in, ...]``). That dimension's size must be a multiple of ``m``.
    In each group the ``n`` largest by (|w|, index) are protected and the other ``m - n`` are
    candidates. A target ``s <= 1 - n/m`` prunes exactly the ``round(s * numel)`` smallest
    candidates by (|w|, index in the weight viewed with its reduction dimension last)
    (``scope="layer"``, per tensor) or ``round(s * total)`` of all tensors' candidates by one
    threshold (``scope="global"``, ties: tensor position, then index): no group ever loses
    more than ``m - n``, and at ``s = 1 - n/m`` every group keeps exactly ``n`` (a valid n:m
    pattern). A target above ``1 - n/m`` is a ValueError. Sharded (DTensor) parameters are
    not supported.

    A weight whose reduction dimension is not its last is selected through its view with that
    dimension last (a contiguous copy kept with the prepared step, one copy per prune step,
    none per optimizer step); its mask is then permuted back to the weight's own order.

    Sources: 2:4 along the reduction dimension is the pattern of sparse tensor cores (Mishra et
    al., "Accelerating Sparse Deep Neural Networks", arXiv 2104.08378); training toward N:M
    gradually rather than in one shot is studied by Kao et al., "Training Recipe for N:M
    Structured Sparsity with Decaying Pruning Mask" (arXiv 2209.07617); here GMP's schedule
    ramps it.
    """

    name = "nm"
    needs_layout = True

    def __init__(self, n: int, m: int, scope: str = "layer") -> None:
        self.nm = check_nm((n, m))
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        self.scope = scope
        self.per_tensor_targets = scope == "layer"
        self.pattern = NMPattern(*self.nm)

    def params(self) -> dict[str, object]:
        return {"n": self.nm[0], "m": self.nm[1], "scope": self.scope}

    @property
    def max_sparsity(self) -> float:
        """``1 - n/m``, the sparsity at which every group keeps exactly ``n`` (exact in
        binary: ``m`` is a power of two)."""
        n, m = self.nm
        return 1 - n / m

    def counts(self, numels: Sequence[int], targets: Sequence[float]) -> list[int]:
        n, m = self.nm
        for target in targets:
            if target > self.max_sparsity:
                raise ValueError(
                    f"sparsity {target!r} is above 1 - n/m = {self.max_sparsity} of the {n}:{m} "
                    f"pattern, which prunes at most {m - n} of every {m} weights"
                )
        if self.per_tensor_targets:
            return [ops.prune_count(count, t) for count, t in zip(numels, targets)]
        return [ops.prune_count(sum(numels), targets[0])] if numels else [0]

    def key_space(self, dtypes: set[torch.dtype]) -> int:
        return key_space_for(dtypes) if self.scope == "global" else KEY_SPACE_NATIVE

    def check(
        self,
        tensors: Sequence[torch.Tensor],
        names: Sequence[str] | None = None,
        reduction_dims: Sequence[int] | None = None,
    ) -> None:
        """ValueError unless every tensor's reduction dimension (default: the last, as the
        views the selection ranks have it) splits into whole groups of ``m``."""
        n, m = self.nm
        if any_dtensor(tensors):
            raise NotImplementedError(
                f"nm=({n}, {m}) does not take sharded (DTensor) parameters yet; prune them "
                "unstructured, or gather the full weights first"
            )
        if self.scope == "global":
            primitives.check_one_device(tensors)
        labels = names if names is not None else [f"#{i}" for i in range(len(tensors))]
        dims = reduction_dims or [t.dim() - 1 for t in tensors]
        for tensor, name, dim in zip(tensors, labels, dims):
            shape = tuple(tensor.shape)
            if tensor.dim() < 2 or shape[dim] % m:
                size = "none" if tensor.dim() < 2 else shape[dim]
                raise ValueError(
                    f"parameter '{name}' of shape {shape} cannot be pruned {n}:{m}: groups are "
                    f"{m} consecutive weights along its reduction (input) dimension {dim}, of "
                    f"size {size}, not a multiple of {m} (leave it out with exclude=[{name!r}], "
                    "or declare its layout with gmp_ext.register_layer)"
                )

    def masks(
        self,
        names: Sequence[str],
        tensors: Sequence[torch.Tensor],
        targets: Sequence[float],
        reuse: Sequence[torch.Tensor | None] | None = None,
        prepare: Prepare | None = None,
        reduction_dims: Sequence[int] | None = None,
        zero_pruned: bool = False,
        score: Score | None = None,
    ) -> tuple[list[torch.Tensor], list[float]]:
        dims = list(reduction_dims) if reduction_dims is not None else [1] * len(tensors)
        self.check(tensors, names, [d if t.dim() > d else 0 for t, d in zip(tensors, dims)])
        counts = self.counts([t.numel() for t in tensors], targets)
        scored = self.scored(score, names, tensors, counts)
        if isinstance(scored, Ranked) and scored.mapped:
            n, m = self.nm
            raise ValueError(
                f"nm=({n}, {m}) ranks non-negative scores only (its groups protect their largest "
                f"values); score {score.name if score else None!r} gave negative values"
            )
        views = [reduction_last(t.detach(), d) for t, d in zip(tensors, dims)]
        moved = [v.dim() > 1 and d != v.dim() - 1 for v, d in zip(views, dims)]
        if isinstance(scored, Ranked):  # the values in the views' order, as the kernels read them
            ranked = [reduction_last(r, d).contiguous() for r, d in zip(scored.ranked, dims)]
            scored = Ranked(ranked, ranked, None)
        elif isinstance(scored, Scaled):  # the factors along the views' dimensions
            scales = [s.moved(d, -1, t.dim()) for s, d, t in zip(scored.scales, dims, tensors)]
            scored = Scaled(scales, scored.score)
        # Masks of permuted views are built in the views' order, then permuted back in place (the
        # same storage each step, so the store's prepared step stays bound to it).
        masks, thresholds = self.masks_with(
            names, views, counts, reuse, prepare, zero_pruned, scored
        )
        for i, dim in enumerate(dims):
            if moved[i]:
                keep = restore_layout(ops.unpack_mask(masks[i], views[i].shape), dim)
                packed = ops.pack_mask(keep.contiguous())
                masks[i][: packed.numel()].copy_(packed)
        return masks, thresholds

    def masks_for_counts(
        self,
        names: Sequence[str],
        tensors: Sequence[torch.Tensor],
        counts: Sequence[int],
        reuse: Sequence[torch.Tensor | None] | None = None,
        scored: Scored = None,
    ) -> tuple[list[torch.Tensor], list[float]]:
        """:meth:`masks` for counts already known, through a prepared step made for the call
        (thresholds index positions in the candidate lists)."""
        return self._prepared_masks(names, tensors, counts, reuse, PreparedStep, False, scored)


def selection_for(scope: str | Selection, nm: object = None) -> Selection:
    """The strategy a ``scope`` argument names (``"layer"``, ``"global"``, or a strategy),
    N:M when ``nm=(n, m)`` is given (not with a strategy)."""
    if nm is not None:
        if isinstance(scope, Selection):
            raise ValueError("give nm=(n, m) or a Selection as scope, not both")
        n, m = check_nm(nm)
        return NMSelection(n, m, scope)
    if isinstance(scope, Selection):
        return scope
    if scope == "layer":
        return LayerSelection()
    if scope == "global":
        return GlobalSelection()
    raise ValueError(f"scope must be 'layer', 'global' or a Selection, got {scope!r}")


def selection_from_dict(spec: Mapping[str, object]) -> Selection:
    """The strategy a :meth:`Selection.to_dict` describes (ValueError for an unknown name)."""
    params = dict(spec)
    name = params.pop("name", None)
    if not isinstance(name, str) or name not in _SELECTIONS:
        raise ValueError(f"unknown selection {name!r}; known: {sorted(_SELECTIONS)}")
    return _SELECTIONS[name](**params)
