"""Distributed GMP on torch.distributed: DDP replicas and FSDP2 / DTensor shards.

**DDP.** Replicas hold identical weights and the selection is deterministic (ties go to the
lowest index), so every rank computes the same masks on its own, without communication.
:func:`verify_masks_across_ranks` proves it with one 64-bit hash per mask; with
``GMP_EXT_DEBUG_DISTRIBUTED=1`` every :func:`gmp_ext.prune_step` runs it. Names are the user's
model names; the ``module.`` prefix DDP adds is accepted and dropped.

**Sharded parameters.** A DTensor placed ``Shard(0)`` on a 1-D mesh (what FSDP2's
``fully_shard`` makes) holds on mesh coordinate c a contiguous block of rows, so in flat order
the elements of coordinate c follow those of every coordinate before it. The selection is the
single-process radix select over the |w| keys of the local shards, with the histograms of each
pass summed over the mesh's process group:

1. a pass histograms one digit of the keys of every shard, among the keys whose higher digits
   are the prefix chosen so far; one all-reduce carries all parameters' histograms, and every
   rank then picks the same bucket (the one holding the k-th key) and the rank inside it;
2. after the last digit every rank knows the threshold key T and the rank r of the cut among
   the elements equal to T; the ranks all-gather how many elements equal T they hold (read off
   the last local histogram), and each rank places r in its own shard: all of its ties are
   pruned, none, or, on the one rank holding the r-th, those up to a local index found by one
   scan of the shard.

That is the single-process contract on the full tensors (k = round(s * n) of the full size,
ties to the lowest global index; in global scope by tensor position first), and the weights
never move. Rows are written per local shard, so the mask build and the fused apply are the
single-process kernels on the local tensors.
"""

from __future__ import annotations

from gmp_ext.distributed.collectives import COMM_STATS, CommStats
from gmp_ext.distributed.masks import (
    export_sharded_mask,
    import_sharded_mask,
    keep_flags,
    kept_counts,
    mask_sparsities,
    summed_over_shards,
    zero_counts,
)
from gmp_ext.distributed.select import select_global_sharded, select_layerwise_sharded
from gmp_ext.distributed.verify import DEBUG_ENV, debug_checks_enabled, verify_masks_across_ranks

__all__ = [
    "COMM_STATS",
    "DEBUG_ENV",
    "CommStats",
    "debug_checks_enabled",
    "export_sharded_mask",
    "import_sharded_mask",
    "keep_flags",
    "kept_counts",
    "mask_sparsities",
    "select_global_sharded",
    "select_layerwise_sharded",
    "summed_over_shards",
    "verify_masks_across_ranks",
    "zero_counts",
]
