"""A prune step prepared once and run many times without waiting for the device.

``prune_step`` resolves and validates the parameters and reads NaN counts back on every call,
which is right for a call once per epoch. :class:`PrunePlan` does that work once: tensor tables,
counts, selection rows and scratch are allocated when the plan is made, the masks are the
model's own (written in place), and :meth:`PrunePlan.step` is a fixed sequence of launches
(select, build, apply per device) with nothing read back. On CUDA it can be captured in a CUDA
graph; :meth:`PrunePlan.set_sparsity` changes the counts the graph reads between replays, and
:meth:`PrunePlan.check` reports NaN weights after the fact. A NaN weight voids its selection:
mask build leaves the affected masks as they were (every mask, in global scope).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gmp_ext import distributed
from gmp_ext.kernels import ops, primitives
from gmp_ext.kernels.dtensors import any_dtensor
from gmp_ext.kernels.engine import PreparedStep
from gmp_ext.model.mask_store import MaskEntry, ensure_store, get_store
from gmp_ext.model.parameters import reduction_dims, unwrap
from gmp_ext.pruning.pruner import ParamSpec, SparsitySpec, targets_of
from gmp_ext.pruning.strategies import Selection, selection_for
from gmp_ext.scores import KeyScale, Ranked, Scaled, ScoreSpec, rank_tensors, score_for

__all__ = ["PrunePlan"]


class PrunePlan:
    """Select -> build -> apply for a fixed set of parameters, prepared once.

    ``scope``, ``nm``, ``params``, ``exclude`` and ``score`` choose, group and rank the
    parameters as in :func:`gmp_ext.prune_step` (a score other than magnitude computes its
    values in Python at every step, into buffers the plan holds: such a step reads the score
    back and is not captured in a CUDA graph); ``sparsity`` (a number, or {name: sparsity} in
    layer scope) sets the first counts. The plan writes the masks kept in the model's mask
    store in place, so :func:`gmp_ext.attach`, :func:`gmp_ext.masks` and
    :func:`gmp_ext.apply_masks` see every update; parameters without a mask yet start with
    all weights kept.

    Memory held while the plan lives: the CUDA selection scratch (one bit per weight), a
    contiguous copy of each non-contiguous parameter, a few bytes per parameter and, with
    ``nm=(n, m)``, the candidate lists (``1 - n/m`` of the weights' bytes).
    Sharded (DTensor) parameters need collectives between passes and are pruned by
    :func:`gmp_ext.prune_step` instead.

    Example (a CUDA graph that prunes at a sparsity set outside it)::

        plan = gmp_ext.PrunePlan(model, 0.5, scope="global")
        plan.step()                       # warm-up, eager
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            plan.step()
        plan.set_sparsity(0.7)
        graph.replay()
        plan.check()                      # {name: sparsity}; raises on NaN weights

    The graph reads the plan's tables, scratch and masks by address at every replay: keep the
    plan alive as long as the graph, and capture again after a step that re-prepared it (its
    parameters moved), which frees what the old graph reads. Set the sparsity on the stream
    that replays the graph.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: SparsitySpec = 0.0,
        *,
        scope: str | Selection = "layer",
        nm: tuple[int, int] | None = None,
        params: ParamSpec = None,
        exclude: Sequence[str] | str | None = None,
        score: ScoreSpec = None,
    ) -> None:
        self._selection = selection_for(scope, nm)
        self._score = score_for(score)
        selected, _ = targets_of(model, sparsity, params, exclude, self._selection)
        if any_dtensor(list(selected.values())):
            raise NotImplementedError(
                "PrunePlan does not take sharded (DTensor) parameters: their selection "
                "all-reduces histograms between passes; use gmp_ext.prune_step"
            )
        self._model = model
        self._names = list(selected)
        self._params = [selected[n] for n in self._names]
        self._labels = [f"parameter '{n}'" for n in self._names]
        if self._selection.needs_layout:
            dims = reduction_dims(unwrap(model)[0], self._names)
            transposed = [
                f"'{n}' (dimension {d} of {tuple(p.shape)})"
                for n, p, d in zip(self._names, self._params, dims)
                if d != p.dim() - 1
            ]
            if transposed:
                raise NotImplementedError(
                    "PrunePlan prunes N:M only along a weight's last dimension, and the "
                    f"reduction dimension of {', '.join(transposed)} is another: use "
                    "gmp_ext.prune_step or gmp_ext.GMP (they select through a permuted copy), "
                    "or exclude= them"
                )
        self._selection.check(self._params, self._names)
        store = get_store(model)
        self._entries = {}
        for name, param in zip(self._names, self._params):
            mask = None if store is None else store.reusable_mask(name, param)
            self._entries[name] = MaskEntry(param, self._all_kept(param) if mask is None else mask)
        self._counts: list[int] = [0] * len(self._params)
        self._scored: Ranked | None = None  # a signed score's last mapping (for thresholds)
        # A score's ranked values (or a scaled score's factors, made at its first step) live in
        # buffers of the plan, so the step's tables stay bound.
        self._ranked: list[torch.Tensor] | None = None
        self._scales: list[KeyScale] | None = None
        if not self._score.in_place and not self._score.scaled:
            self._ranked = [torch.empty(p.shape, device=p.device) for p in self._params]
        self._prepare()
        self.set_sparsity(sparsity)
        # The score refuses a layer before it hooks any; its hooks live as long as the plan (or
        # until gmp_ext.remove(model)).
        handles = self._score.attach(model, self._names)
        store = ensure_store(model)
        store.set_masks(self._entries)
        store.hooks.extend(handles)
        weakref.finalize(self, _remove_all, handles)

    @staticmethod
    def _all_kept(param: torch.Tensor) -> torch.Tensor:
        """A mask keeping every weight (the bits past the last element stay 0)."""
        mask = primitives.new_mask(param)
        full, rest = divmod(param.numel(), 8)
        mask[:full] = 0xFF
        if rest:
            mask[full] = (1 << rest) - 1
        return mask

    def _prepare(self) -> None:
        """The prepared step, bound to the parameters' current storage and the masks."""
        masks = [self._entries[n].mask for n in self._names]
        dtypes = {p.dtype for p in self._params}
        if self._score.scaled:  # its keys are float32 products, whatever the weights' dtype
            dtypes.add(torch.float32)
        key_space = self._selection.key_space(dtypes)
        tensors = [p.detach() for p in self._params]
        scope, pattern = self._selection.scope, self._selection.pattern
        self._step = PreparedStep(
            tensors, masks, scope, key_space, pattern, self._ranked, self._scales
        )
        self._devices = [p.device for p in self._params]

    @property
    def names(self) -> list[str]:
        """The pruned parameters, in selection order."""
        return list(self._names)

    @property
    def counts(self) -> dict[str, int]:
        """Elements each parameter prunes at the next step (global scope: the total, under the
        first name; its split between parameters is known after the step)."""
        return dict(zip(self._names, self._counts))

    def set_sparsity(self, sparsity: SparsitySpec) -> None:
        """Counts for the next steps: ``round(sparsity * numel)`` per parameter (layer scope,
        a number or {name: sparsity} naming every parameter) or ``round(sparsity * total)``
        (global scope). Written to the device without waiting; call it outside graph capture."""
        if isinstance(sparsity, Mapping):
            if not self._selection.per_tensor_targets:
                raise ValueError("a per-parameter sparsity dict needs scope='layer'")
            missing = sorted(set(self._names) - set(sparsity))
            extra = sorted(set(sparsity) - set(self._names))
            if missing or extra:
                raise ValueError(
                    "the sparsity dict must name exactly the plan's parameters: "
                    f"missing {missing}, not in the plan {extra}"
                )
            targets = [ops.check_sparsity(sparsity[n], f"sparsity[{n!r}]") for n in self._names]
        else:
            targets = [ops.check_sparsity(sparsity)] * len(self._names)
        counts = self._selection.counts([p.numel() for p in self._params], targets)
        self._step.set_counts(counts, self._selection.per_tensor_targets)
        self._counts = counts
        self._sparsity = sparsity
        for name, target in zip(self._names, targets):
            self._entries[name].target = target

    def step(self) -> None:
        """Fresh masks from the current weights, and the pruned weights zeroed in place: launches
        only on CUDA (nothing allocated, nothing read back). A parameter whose storage moved
        since the last step (``.to()``, ``.half()``), or that the model replaced by another
        (``load_state_dict(..., assign=True)``), gets new tables first, outside any graph;
        masks that ``prune_step`` or ``remove`` replaced in the store are the plan's again."""
        store = ensure_store(self._model)
        if any(store.entries.get(n) is not e for n, e in self._entries.items()):
            store.set_masks(self._entries)  # prune_step or remove() replaced them since
        store.resolve()  # parameters the model replaced (load_state_dict(assign=True), ...)
        self._params = [self._entries[n].param for n in self._names]
        masks = [self._entries[n].mask for n in self._names]
        if torch.compiler.is_compiling():
            if not self._score.in_place:  # its values are made in Python at every step
                raise RuntimeError(
                    f"PrunePlan.step() with score {self._score.name!r} cannot run under "
                    "torch.compile (the score's values are computed eagerly at each step); "
                    "call the plan's step outside the compiled region"
                )
            # The operators take the parameters and masks as they are now: no binding to check
            # (Dynamo cannot trace raw addresses), and no detached aliases as graph inputs.
            self._check_devices()
            self._step.run_operators(self._params, masks)
            return
        if self._score.scaled:
            self._scale()
        live = [p.detach() for p in self._params]
        if self._step.key != PreparedStep.binding(live, masks, self._ranked, self._scales):
            self._check_devices()
            self._prepare()
            self.set_sparsity(self._sparsity)
        if self._ranked is not None:
            self._rank()
        self._step.run()

    def _scale(self) -> None:
        """A scaled score's factors for this step, into the plan's vectors (made at the first
        step, and again if a factor's length or dimension changed)."""
        scaled = rank_tensors(
            self._score, self._names, self._params, self._counts, self._selection.per_tensor_targets
        )
        assert isinstance(scaled, Scaled)
        if self._scales is None or any(
            old.dim != new.dim or old.factors.shape != new.factors.shape
            for old, new in zip(self._scales, scaled.scales)
        ):
            self._scales = [KeyScale(s.factors.clone(), s.dim) for s in scaled.scales]
        else:
            with torch.no_grad():
                for old, new in zip(self._scales, scaled.scales):
                    old.factors.copy_(new.factors)
        self._score.reset()

    def _rank(self) -> None:
        """The score's values for this step, into the plan's buffers (computed in Python, and a
        signed score's mapping reads its negative counts: such a step is not graph-capturable)."""
        scored = rank_tensors(
            self._score, self._names, self._params, self._counts, self._selection.per_tensor_targets
        )
        assert isinstance(scored, Ranked)
        assert self._ranked is not None
        if scored.mapped and self._selection.needs_layout:
            raise ValueError(
                f"nm= ranks non-negative scores only; score {self._score.name!r} gave negative "
                "values (nothing was modified)"
            )
        with torch.no_grad():
            for buffer, ranked in zip(self._ranked, scored.ranked):
                buffer.copy_(ranked)
        self._scored = scored if scored.mapped else None
        self._score.reset()

    def _check_devices(self) -> None:
        if [p.device for p in self._params] != self._devices:
            raise RuntimeError(
                "the plan's parameters moved to another device; make a new PrunePlan"
            )

    def check(self) -> dict[str, float]:
        """Waits for the last step and returns {name: sparsity of its mask}; raises ValueError
        naming the parameters that held NaN weights (their masks were left as they were)."""
        # Counted by the selection: apply may since have zeroed pruned NaNs.
        counts = self._step.nan_counts()
        # A scaled score's NaN values: a NaN weight, or an infinite one against a zero factor.
        what = f"{self._score.name!r} scores" if self._score.scaled else "weights"
        if not self._selection.per_tensor_targets and counts and counts[0]:
            ranked = self._step.ranked_values()
            holders = [label for label, v in zip(self._labels, ranked) if torch.isnan(v).any()]
            raise ValueError(
                f"{counts[0]} NaN {what} among the plan's parameters"
                f"{' (in ' + ', '.join(holders) + ')' if holders else ''}: NaN values cannot "
                "be ranked, so the last step left every mask as before"
            )
        nan_params = [f"{label} ({c})" for label, c in zip(self._labels, counts) if c]
        if nan_params:
            raise ValueError(
                f"NaN {what} in {', '.join(nan_params)}: NaN values cannot be ranked, so the "
                "last step left their masks as before"
            )
        thresholds = (
            self._step.thresholds()
            if self._scored is None
            else self._scored.cuts(self._step.rows(), self._selection.per_tensor_targets)
        )
        for name, threshold in zip(self._names, thresholds):
            self._entries[name].threshold = threshold
        return distributed.mask_sparsities(self._entries)


def _remove_all(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
