"""The prune-step engine: select -> build -> apply over backend jobs prepared once.

A :class:`PreparedStep` binds a list of tensors and their masks to one backend job per
(device, backend) group: tables, counts, selection rows and scratch are allocated when it is
made, non-contiguous tensors (``channels_last``) are staged through contiguous copies kept with
it, and running it is launches only (on CUDA nothing is allocated or read back, so it can be
captured in a CUDA graph). The mask store's per-step re-apply, :class:`gmp_ext.PrunePlan` and
the eager prune step all run through it.

The engine knows no pattern and no score. What is ranked is the tensors themselves (magnitude:
the fused prune, which ranks and zeroes the same memory), their |w| times per-feature factors
(``scales``: the kernels multiply as they read, so the fused prune still applies), or separate
``ranked`` tensors a score computed (the masks are built from those, then applied to the
tensors). How the ranked values become masks is the strategy's :class:`StepPattern`:
:data:`UNSTRUCTURED` ranks every element; an N:M pattern
(:class:`gmp_ext.pruning.strategies.NMPattern`) ranks candidate lists.

Under ``torch.compile`` the same stages run as the operators of :mod:`gmp_ext.kernels.library`
(``torch.ops.gmp_ext.*``), which take tensors where the jobs hold raw addresses: Dynamo traces
them without a graph break, and their kernels find the tables in a cache keyed by storage.
Eagerly, the jobs run directly, without the dispatcher's per-call cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gmp_ext.kernels import library, primitives
from gmp_ext.kernels.backends import REFERENCE, Backend, Job, backend_for
from gmp_ext.kernels.layout import KEY_SPACE_NATIVE, KeyScale

__all__ = ["UNSTRUCTURED", "PreparedStep", "StepPattern"]


class StepPattern:
    """How a prepared step turns ranked values into masks: one select over a job, one build
    from its rows. This base is the unstructured pattern (every element ranked); a structured
    pattern overrides the methods, keeping the contract: :meth:`prepare` allocates what its
    select needs beside ``source`` (the job over the ranked tensors and the masks),
    :meth:`select` writes rows into the job :meth:`prepare` returned (``source`` when None),
    :meth:`build` writes the masks of ``source`` from them. ``*_operators`` are the same over
    tensors, for ``torch.compile``. ``fusable`` says whether select + build + apply may run
    as the backend's fused prune when the ranked tensors are the zeroed ones."""

    fusable = True
    exact_nan_counts = True  # the selection's rows count every NaN (else they are recounted)

    def prepare(
        self,
        backend: Backend,
        ranked: Sequence[torch.Tensor],
        scope: str | None,
        key_space: int,
        scales: Sequence[KeyScale | None] | None = None,
    ) -> Job | None:
        return None

    def select(self, backend: Backend, source: Job, lists: Job | None) -> None:
        backend.select(source)

    def build(self, backend: Backend, source: Job, lists: Job | None) -> None:
        backend.build(source)

    def select_operators(
        self,
        ranked: Sequence[torch.Tensor],
        lists: Job | None,
        counts: torch.Tensor,
        scope: str | None,
        key_space: int,
    ) -> torch.Tensor:
        if scope == "layer":
            return library.select_layerwise(ranked, counts)
        return library.select_global(ranked, counts, key_space)

    def build_operators(
        self,
        ranked: Sequence[torch.Tensor],
        rows: torch.Tensor,
        masks: Sequence[torch.Tensor],
        wide64: bool,
    ) -> None:
        library.build_masks(ranked, rows, masks, wide64)


UNSTRUCTURED = StepPattern()


@dataclass(eq=False)
class _Group:
    """Tensors of one device (and backend) and the jobs that run them."""

    indices: list[int]
    backend: Backend
    job: Job  # the tensors and their masks (what apply zeroes)
    staged: list[tuple[torch.Tensor, torch.Tensor]]  # (tensor, contiguous copy) pairs
    ranked: Job | None = None  # a score's ranked tensors and the same masks (None: ``job``)
    lists: Job | None = None  # what the pattern selects over, when not the ranked tensors
    counted: bool = False  # job.kept counts the masks as the last run's build left them

    @property
    def source(self) -> Job:
        """The job over what is ranked, whose masks the build writes."""
        return self.job if self.ranked is None else self.ranked

    @property
    def selection(self) -> Job:
        """The job whose rows the selection writes."""
        return self.source if self.lists is None else self.lists


class PreparedStep:
    """Select -> build -> apply for fixed ``tensors`` (detached, local: a DTensor's shard) and
    their ``masks`` (mask storage, written in place).

    ``scope`` is the selection's job kind (``"layer"``, ``"global"``) or None for a step that
    only applies the masks; ``key_space`` the keys it ranks in. A selection in the float64 key
    space, and float64 tensors, run on the reference backend. ``pattern`` (a
    :class:`StepPattern`) says how the ranked values become masks; ``ranked`` (one tensor per
    tensor, same number of elements) is what a score ranks instead of the tensors' |w|: the
    masks are built from it and applied to the tensors. ``scales`` (one per tensor, None for
    |w|; not with ``ranked``) make the kernels rank each tensor's |w| times its factors.

    Streams and graphs (CUDA): the step's buffers are written on the stream current when it is
    made, and a run on another stream first waits for them; the step's scratch is shared by its
    runs, so run it on one stream at a time. A CUDA graph that captured :meth:`run` reads the
    step's tables, scratch and staged copies at every replay: keep the step (or the
    :class:`gmp_ext.PrunePlan` holding it) alive as long as the graph. Make it before a capture:
    preparing during one is refused.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        scope: str | None = None,
        key_space: int = KEY_SPACE_NATIVE,
        pattern: StepPattern = UNSTRUCTURED,
        ranked: Sequence[torch.Tensor] | None = None,
        scales: Sequence[KeyScale | None] | None = None,
    ) -> None:
        if ranked is not None and scales is not None:
            raise ValueError("a prepared step ranks score tensors or scaled |w|, not both")
        self.tensors = list(tensors)
        self.masks = list(masks)
        self.ranked = None if ranked is None else list(ranked)
        self.scales = None if scales is None else list(scales)
        self.scope = scope
        self.key_space = key_space
        self.pattern = pattern
        self.key = self.binding(self.tensors, self.masks, self.ranked, self.scales)
        on_reference = [primitives.uses_reference(key_space)] * len(self.tensors)
        self.groups: list[_Group] = []
        for (_, reference), indices in primitives.groups(self.tensors, on_reference).items():
            staged, work = [], []
            for i in indices:
                tensor = self.tensors[i]
                if not tensor.is_contiguous():
                    staged.append((tensor, tensor.contiguous()))
                    tensor = staged[-1][1]
                work.append(tensor)
            backend = REFERENCE if reference else backend_for(work[0].device)
            masks = [self.masks[i] for i in indices]
            ranked_work = work if self.ranked is None else [self.ranked[i] for i in indices]
            scales = None if self.scales is None else [self.scales[i] for i in indices]
            lists = pattern.prepare(backend, ranked_work, scope, key_space, scales)
            selecting = scope if lists is None else None
            if self.ranked is None:
                job = backend.prepare(work, masks, selecting, key_space, scales)
                self.groups.append(_Group(indices, backend, job, staged, None, lists))
                continue
            job = backend.prepare(work, masks, None, key_space)
            source = backend.prepare(ranked_work, masks, selecting, key_space)
            self.groups.append(_Group(indices, backend, job, staged, source, lists))

    @staticmethod
    def binding(
        tensors: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        ranked: Sequence[torch.Tensor] | None = None,
        scales: Sequence[KeyScale | None] | None = None,
    ) -> tuple:
        """What a prepared step is bound to: the tensors' (and ranked tensors' or factors')
        storage and layout, the masks' storage. A step whose binding differs from the current
        one must be prepared again."""
        layout = tuple((t.data_ptr(), t.stride(), t.dtype, t.device) for t in tensors)
        scored = () if ranked is None else tuple((r.data_ptr(), r.dtype) for r in ranked)
        factors = (
            () if scales is None else tuple(s and (s.factors.data_ptr(), s.dim) for s in scales)
        )
        return layout + tuple(m.data_ptr() for m in masks) + (scored, factors)

    def set_counts(self, counts: Sequence[int], per_tensor: bool) -> None:
        """Elements to prune at the next select: one count per tensor (``per_tensor``), or one
        for all (then the step has one group). Written without waiting for the device."""
        for group in self.groups:
            group.selection.set_counts([counts[i] for i in group.indices] if per_tensor else counts)

    def run(
        self, select: bool = True, build: bool = True, apply: bool = True, restage: bool = True
    ) -> None:
        """The chosen stages, in order, for every group (as operators when compiling).
        ``restage=False`` keeps the contiguous copies of non-contiguous tensors as the last run
        left them (the caller knows nothing wrote the tensors since)."""
        if torch.compiler.is_compiling():
            self.run_operators(self.tensors, self.masks, select, build, apply)
            return
        with torch.no_grad():
            for group in self.groups:
                for tensor, copy in group.staged if restage else ():
                    copy.copy_(tensor)
                self._run_group(group, select, build, apply)
                for tensor, copy in group.staged:
                    if apply:
                        tensor.copy_(copy)

    def _run_group(self, group: _Group, select: bool, build: bool, apply: bool) -> None:
        backend, job, pattern = group.backend, group.job, self.pattern
        group.counted = group.counted and not build
        # Ranking the zeroed memory itself, build + apply are one pass over the weights (the
        # build zeroes what it prunes); with select, one prune call, which reads them twice
        # where the kernels can.
        fused = build and apply and group.ranked is None and pattern.fusable
        if select and fused:
            backend.prune(job)
            return
        if select:
            pattern.select(backend, group.source, group.lists)
        if build and fused:
            backend.build(job, zero_pruned=True)
            group.counted = backend.counts_in_build
            return
        if build:
            pattern.build(backend, group.source, group.lists)
        if apply:
            backend.apply(job)

    def run_operators(
        self,
        tensors: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        select: bool = True,
        build: bool = True,
        apply: bool = True,
    ) -> None:
        """:meth:`run` through ``torch.ops.gmp_ext``, over ``tensors`` and ``masks`` laid out
        like the step's (the parameters themselves, say, rather than detached aliases of them,
        which a compiled graph would see as two inputs sharing storage), with the step's counts.
        The rows land in the step's buffers, where :meth:`rows` reads them."""
        wide64 = primitives.uses_reference(self.key_space)
        pattern = self.pattern
        with torch.no_grad():
            for group in self.groups:
                group.counted = group.counted and not build
                selection = group.selection
                work = [tensors[i] for i in group.indices]
                group_masks = [masks[i] for i in group.indices]
                ranked = work if self.ranked is None else [self.ranked[i] for i in group.indices]
                if self.scales is not None:  # the operators rank tensors: scaled |w| made here
                    scales = [self.scales[i] for i in group.indices]
                    ranked = [t if s is None else s.weighted(t) for t, s in zip(work, scales)]
                if (
                    select
                    and build
                    and apply
                    and self.ranked is None
                    and self.scales is None
                    and pattern.fusable
                ):
                    global_scope = self.scope == "global"
                    rows = library.prune(
                        work, selection.counts, group_masks, global_scope, self.key_space
                    )
                    selection.rows.copy_(rows)
                    continue
                if select:
                    rows = pattern.select_operators(
                        ranked, group.lists, selection.counts, self.scope, self.key_space
                    )
                    selection.rows.copy_(rows)
                if build:
                    pattern.build_operators(ranked, selection.rows, group_masks, wide64)
                if apply:
                    library.apply_masks(work, group_masks)

    def rows(self) -> list[torch.Tensor]:
        """The last selection's rows, in tensor order (on each group's device)."""
        rows: list[torch.Tensor] = [torch.empty(0)] * len(self.tensors)
        for group in self.groups:
            for j, i in enumerate(group.indices):
                rows[i] = group.selection.rows[j]
        return rows

    def nan_counts(self) -> list[int]:
        """NaN values the last selection counted per ranked tensor (global scope: the total, on
        the first tensor of the group); waits for the device. A pattern whose rows do not count
        every NaN (N:M sees at most one per group) has them counted again from the ranked
        tensors when there are any."""
        counts = [0] * len(self.tensors)
        for group in self.groups:
            for i, count in zip(group.indices, group.selection.rows[:, 3].tolist()):
                counts[i] = count
        if not self.pattern.exact_nan_counts and any(counts):
            nans = [int(torch.isnan(t).sum()) for t in self.ranked_values()]
            if self.scope == "global":
                for group in self.groups:
                    counts[group.indices[0]] = sum(nans[i] for i in group.indices)
            else:
                counts = nans
        return counts

    def ranked_values(self) -> list[torch.Tensor]:
        """What the selection ranks, as tensors (scaled |w| made here: a copy per tensor)."""
        if self.ranked is not None:
            return self.ranked
        if self.scales is not None:
            return [t if s is None else s.weighted(t) for t, s in zip(self.tensors, self.scales)]
        return self.tensors

    def kept_counts(self) -> list[int]:
        """Elements each mask keeps (set bits among its tensor's ``numel``): what the last run's
        build counted where the backend counts in its build, else counted now over the table the
        group's job has. Call it before anything else writes the masks."""
        counts = [0] * len(self.tensors)
        for group in self.groups:
            job = group.job
            kept = job.kept.tolist() if group.counted else group.backend.count_kept(job)
            for i, count in zip(group.indices, kept):
                counts[i] = count
        return counts

    def thresholds(self) -> list[float]:
        """The ranked value at the last selection's cut, per tensor (|w| without a score;
        global scope: the cut over all)."""
        ranked = self.tensors if self.ranked is None else self.ranked
        dtypes = [t.dtype for t in ranked]
        if self.scales is not None:  # a scaled key is a float32 value, whatever the weight's dtype
            dtypes = [d if s is None else torch.float32 for d, s in zip(dtypes, self.scales)]
        values = [0.0] * len(self.tensors)
        for group in self.groups:  # one read-back of a group's rows (not one per tensor)
            for i, (key, _, key_space, _) in zip(group.indices, group.selection.rows.tolist()):
                values[i] = primitives.key_to_value(key, key_space, dtypes[i])
        return values
