"""Deploying a pruned model: dense checkpoints with a mask sidecar (:mod:`.exporter`: what
``from_pretrained`` and vLLM load), compressed-tensors sparse checkpoints (:mod:`.sparse`), and
2:4 semi-structured weights for sparse tensor cores (:mod:`.semi_structured`)."""

from __future__ import annotations

from gmp_ext.deploy.exporter import MaskCheck, check_masks, export, load_masks
from gmp_ext.deploy.semi_structured import to_semi_structured
from gmp_ext.deploy.sparse import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    StoredTensor,
    is_nm_sparse,
    load_sparse,
    save_sparse,
)

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "MaskCheck",
    "StoredTensor",
    "check_masks",
    "export",
    "is_nm_sparse",
    "load_masks",
    "load_sparse",
    "save_sparse",
    "to_semi_structured",
]
