"""Selection strategies beyond one threshold per layer or per model."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from . import distributed, engine, ops
from .masks import MaskEntry

__all__ = ["capped_global_masks"]


def capped_global_masks(
    params: Mapping[str, nn.Parameter], target: float, caps: Mapping[str, int]
) -> dict[str, MaskEntry]:
    """Global magnitude masks where layer ``name`` prunes at most ``caps[name]`` elements.

    A global selection over the uncapped layers; every layer above its cap is fixed at its cap
    and the selection is re-run over the rest with the budget reduced by what the fixed layers
    prune, until no cap is violated. Fixing a layer only raises the others' threshold, so a
    layer over its cap stays over it: the result is one threshold over the uncapped layers and
    exactly ``round(target * total)`` pruned in all, unless the caps leave too little room.
    """
    names = list(params)
    k = ops.prune_count(sum(p.numel() for p in params.values()), target)
    entries: dict[str, MaskEntry] = {}
    free: list[str] = names
    fixed: list[str] = []
    while free:
        tensors = [params[n] for n in free]
        budget = min(k - sum(caps[n] for n in fixed), sum(t.numel() for t in tensors))
        rows = engine.select_rows_global(tensors, [f"parameter '{n}'" for n in free], budget)
        masks = ops._build(tensors, rows, ops._wide64(tensors))
        kept = distributed.kept_counts(tensors, masks)
        over = [n for n, t, c in zip(free, tensors, kept) if n in caps and t.numel() - c > caps[n]]
        if not over:
            # The threshold of a global selection is the cut over all of its layers.
            thresholds = ops._thresholds(rows, tensors, [1] * len(free))
            for n, m, th in zip(free, masks, thresholds):
                entries[n] = MaskEntry(params[n], m, target, th.value)
            break
        fixed += over
        free = [n for n in free if n not in over]
    if fixed:
        tensors = [params[n] for n in fixed]
        ks = [caps[n] for n in fixed]
        rows = engine.select_rows_layerwise(tensors, [f"parameter '{n}'" for n in fixed], ks)
        thresholds = ops._thresholds(rows, tensors, ks)
        for n, m, th in zip(fixed, ops._build(tensors, rows), thresholds):
            entries[n] = MaskEntry(params[n], m, target, th.value)
    return {n: entries[n] for n in names}
