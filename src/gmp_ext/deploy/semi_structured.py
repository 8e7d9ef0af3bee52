"""2:4 semi-structured weights: :func:`to_semi_structured` swaps the 2:4-sparse ``nn.Linear``
weights of a model for PyTorch's semi-structured sparse tensors (cuSPARSELt / CUTLASS kernels,
sm_80 and later)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gmp_ext.deploy.sparse import is_nm_sparse
from gmp_ext.model.parameters import bare_name, unwrap
from gmp_ext.pruning import pruner

__all__ = ["SEMI_STRUCTURED_DTYPES", "SEMI_STRUCTURED_MULTIPLES", "to_semi_structured"]


# Rows and columns of a weight must be multiples of these (CUTLASS's limits for fp16/bf16,
# which also satisfy cuSPARSELt's 16 x 16).
SEMI_STRUCTURED_MULTIPLES = (32, 64)
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def _semi_structured_class(backend: str | None) -> Any:
    cusparselt = getattr(torch.backends, "cusparselt", None)
    available = cusparselt is not None and cusparselt.is_available()
    if backend is None:
        backend = "cusparselt" if available else "cutlass"
    if backend == "cusparselt":
        if not available:
            raise RuntimeError(
                "backend='cusparselt': this PyTorch build has no cuSPARSELt "
                "(torch.backends.cusparselt.is_available() is False); use backend='cutlass'"
            )
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    return torch.sparse.SparseSemiStructuredTensorCUTLASS


def _device_problem(weight: torch.Tensor) -> str | None:
    if weight.device.type != "cuda":
        return f"is on {weight.device}"
    major, minor = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        name = torch.cuda.get_device_name(weight.device)
        return f"is on {weight.device} ({name}, sm_{major}{minor})"
    return None


def _linear_weights(model: nn.Module, exclude: list[str]) -> dict[str, nn.Linear]:
    """The Linear modules whose weight is 2:4 sparse (not yet converted, not excluded)."""
    holders: dict[int, set[tuple[int, str]]] = {}  # a module reused under two names: one holder
    for _, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), set()).add((id(module), attr))
    chosen: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or f"{name}.weight" in exclude:
            continue
        weight = module.weight
        if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
            continue
        if is_nm_sparse(weight, 2, 4):
            if len(holders.get(id(weight), ())) > 1:
                raise ValueError(
                    f"'{name}.weight' is tied to another module's parameter: converting it "
                    "would untie them; leave it out with exclude="
                )
            chosen[f"{name}.weight"] = module
    return chosen


def to_semi_structured(
    model: nn.Module, *, exclude: list[str] | None = None, backend: str | None = None
) -> list[str]:
    """Replace the 2:4-sparse ``nn.Linear`` weights of ``model`` by PyTorch's semi-structured
    sparse tensors (``torch.sparse.to_sparse_semi_structured``), for inference on sm_80+ GPUs.

    Converts the weight of every ``nn.Linear`` that :func:`is_nm_sparse` finds 2:4 sparse
    (along ``in_features``, the reduction dimension), except the names in ``exclude``; other
    layers stay dense. The new weights are ``nn.Parameter(..., requires_grad=False)``: the
    model is for inference from then on. ``backend``: ``"cusparselt"`` (default where
    PyTorch has it) or ``"cutlass"``. Returns the converted names (``"<module>.weight"``).

    Checks all layers before converting any. Raises ValueError when no Linear weight is 2:4
    sparse, for a 2:4 weight that is not fp16/bf16 or whose ``[out_features, in_features]`` is
    not a multiple of (32, 64) (name, dtype and shape given; ``exclude=`` leaves it dense),
    for a weight tied to another module, and when gmp_ext still holds masks for a weight to
    convert (``gmp_ext.remove(model)`` first: the masks' re-apply writes into dense weights);
    RuntimeError, naming the weight and where it is, unless every weight to convert is on a
    CUDA GPU of compute capability 8.0 or later.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in (None, "cusparselt", "cutlass"):
        raise ValueError(f"backend must be None, 'cusparselt' or 'cutlass', got {backend!r}")
    names = [exclude] if isinstance(exclude, str) else list(exclude or [])
    inner, prefix = unwrap(model)
    names = [bare_name(n, prefix) for n in names]
    known = dict(inner.named_parameters(remove_duplicate=False))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"exclude entries {unknown} name no parameter of the model")
    chosen = _linear_weights(inner, names)
    if not chosen:
        raise ValueError(
            "no nn.Linear weight of the model is 2:4 sparse (at most 2 non-zeros in every "
            "group of 4 consecutive weights along in_features) outside exclude="
        )
    masked = sorted(set(chosen) & set(pruner.masks(inner)))
    if masked:
        raise ValueError(
            f"gmp_ext holds masks for {masked}: call gmp_ext.remove(model) before converting "
            "(the masks' re-apply writes into dense weights)"
        )
    rows, cols = SEMI_STRUCTURED_MULTIPLES
    for name, module in chosen.items():
        weight = module.weight
        shape = list(weight.shape)
        if weight.dtype not in SEMI_STRUCTURED_DTYPES or shape[0] % rows or shape[1] % cols:
            raise ValueError(
                f"'{name}' ({weight.dtype}, shape {shape}) is 2:4 sparse but the semi-structured "
                f"kernels take fp16/bf16 weights whose shape is a multiple of ({rows}, {cols}); "
                "convert the model (model.half()) or leave the layer out with exclude="
            )
    if not torch.cuda.is_available():
        first = next(iter(chosen))
        raise RuntimeError(
            "2:4 semi-structured sparse weights need a CUDA GPU of compute capability 8.0 or "
            f"later (sm_80+); no CUDA device is available here ('{first}' is on "
            f"{chosen[first].weight.device})"
        )
    for name, module in chosen.items():
        problem = _device_problem(module.weight)
        if problem is not None:
            raise RuntimeError(
                f"2:4 semi-structured sparse weights need a CUDA GPU of compute capability 8.0 "
                f"or later (sm_80+): '{name}' {problem}; move the model there first"
            )
    sparse_class = _semi_structured_class(backend)
    converted = {
        name: sparse_class.from_dense(module.weight.detach().contiguous())
        for name, module in chosen.items()
    }
    for name, module in chosen.items():
        module.weight = nn.Parameter(converted[name], requires_grad=False)
    return list(converted)
