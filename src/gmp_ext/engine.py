"""The prune-step engine: select -> build -> apply over backend jobs prepared once.

A :class:`PreparedStep` binds a list of tensors and their masks to one backend job per
(device, backend) group: tables, counts, selection rows and scratch are allocated when it is
made, non-contiguous tensors (``channels_last``) are staged through contiguous copies kept with
it, and running it is launches only (on CUDA nothing is allocated or read back, so it can be
captured in a CUDA graph). The mask store's per-step re-apply, :class:`gmp_ext.PrunePlan` and
the eager prune step all run through it.

Under ``torch.compile`` the same stages run as the operators of :mod:`gmp_ext.library`
(``torch.ops.gmp_ext.*``), which take tensors where the jobs hold raw addresses: Dynamo traces
them without a graph break, and their kernels find the tables in a cache keyed by storage.
Eagerly, the jobs run directly, without the dispatcher's per-call cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import library, primitives
from ._layout import KEY_SPACE_NATIVE
from .backends import REFERENCE, Backend, Job, backend_for

__all__ = ["PreparedStep"]


@dataclass(eq=False)
class _Group:
    """Tensors of one device (and backend) and the jobs that run them."""

    indices: list[int]
    backend: Backend
    job: Job  # the tensors and their masks (and, without a pattern, their selection)
    staged: list[tuple[torch.Tensor, torch.Tensor]]  # (tensor, contiguous copy) pairs
    lists: Job | None = None  # N:M: the selection over the tensors' candidate lists

    @property
    def selection(self) -> Job:
        """The job whose rows the selection writes."""
        return self.job if self.lists is None else self.lists


class PreparedStep:
    """Select -> build -> apply for fixed ``tensors`` (detached, local: a DTensor's shard) and
    their ``masks`` (mask storage, written in place).

    ``scope`` is the selection's job kind (``"layer"``, ``"global"``) or None for a step that
    only applies the masks; ``key_space`` the keys it ranks in. A selection in the float64 key
    space, and float64 tensors, run on the reference backend.

    With ``pattern=(n, m)`` the step selects N:M (csrc/common/nm.h): select writes each
    tensor's candidate list into a buffer kept with the step and ranks the lists (the ``scope``
    selection over them), build keeps the protected elements and the candidates above the cut.
    Selection rows then index positions in the lists.

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
        pattern: tuple[int, int] | None = None,
    ) -> None:
        self.tensors = list(tensors)
        self.masks = list(masks)
        self.scope = scope
        self.key_space = key_space
        self.pattern = pattern
        self.key = self.binding(self.tensors, self.masks)
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
            if pattern is None:
                job = backend.prepare(work, masks, scope, key_space)
                self.groups.append(_Group(indices, backend, job, staged))
                continue
            n, m = pattern
            lists = [t.new_empty(t.numel() // m * (m - n)) for t in work]
            job = backend.prepare(work, masks, None, key_space)
            listed = backend.prepare(lists, None, scope, key_space)
            self.groups.append(_Group(indices, backend, job, staged, listed))

    @staticmethod
    def binding(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> tuple:
        """What a prepared step is bound to: the tensors' storage and layout, the masks'
        storage. A step whose binding differs from the current one must be prepared again."""
        return tuple((t.data_ptr(), t.stride(), t.dtype, t.device) for t in tensors) + tuple(
            m.data_ptr() for m in masks
        )

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
        backend, job, lists = group.backend, group.job, group.lists
        if lists is not None and self.pattern is not None:  # N:M: the build ranks groups first
            if select:
                backend.nm_gather(job, lists, self.pattern)
                backend.select(lists)
            if build:
                backend.nm_build(job, lists.rows, self.pattern)
            if apply:
                backend.apply(job)
            return
        # build + apply are one pass over the weights (the build zeroes what it prunes); with
        # select, one prune call, which reads them twice where the kernels can.
        fused = build and apply
        if select and fused:
            backend.prune(job)
            return
        if select:
            backend.select(job)
        if build:
            backend.build(job, zero_pruned=fused)
        if apply and not fused:
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
        with torch.no_grad():
            for group in self.groups:
                selection = group.selection
                work = [tensors[i] for i in group.indices]
                group_masks = [masks[i] for i in group.indices]
                if select and build and apply and self.pattern is None:
                    global_scope = self.scope == "global"
                    rows = library.prune(
                        work, selection.counts, group_masks, global_scope, self.key_space
                    )
                    selection.rows.copy_(rows)
                    continue
                if select:
                    ranked = work
                    if group.lists is not None and self.pattern is not None:
                        ranked = group.lists.tensors
                        library.nm_gather(work, ranked, *self.pattern)
                    if self.scope == "layer":
                        rows = library.select_layerwise(ranked, selection.counts)
                    else:
                        rows = library.select_global(ranked, selection.counts, self.key_space)
                    selection.rows.copy_(rows)
                if build and self.pattern is not None:
                    library.nm_build_masks(
                        work, selection.rows, group_masks, *self.pattern, wide64=wide64
                    )
                elif build:
                    library.build_masks(work, selection.rows, group_masks, wide64)
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
        """NaN weights the last selection counted per tensor (global scope: the total, on the
        first tensor of the group); waits for the device. An N:M selection sees at most one NaN
        per group, so its counts are taken again from the tensors when there are any."""
        counts = [0] * len(self.tensors)
        for group in self.groups:
            for i, count in zip(group.indices, group.selection.rows[:, 3].tolist()):
                counts[i] = count
        if self.pattern is not None and any(counts):
            nans = [int(torch.isnan(t).sum()) for t in self.tensors]
            if self.scope == "global":
                for group in self.groups:
                    counts[group.indices[0]] = sum(nans[i] for i in group.indices)
            else:
                counts = nans
        return counts

    def thresholds(self) -> list[float]:
        """|w| at the last selection's cut, per tensor (global scope: the cut over all)."""
        rows = self.rows()
        ones = [1] * len(self.tensors)
        return [th.value for th in primitives.thresholds(rows, self.tensors, ones)]
