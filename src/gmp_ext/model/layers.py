"""What the default selection prunes: the layer types whose weights carry a model's matrix
multiplies, and each weight's reduction (input) dimension, along which N:M groups run.

Built in: ``nn.Linear`` (and subclasses such as ``nn.MultiheadAttention``'s ``out_proj``),
``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``nn.MultiheadAttention``'s input
projections and transformers' ``Conv1D`` (GPT-2's ``[in, out]`` weights, recognised by name so
that transformers is never imported here). :func:`register_layer` adds a custom or
third-party layer type.

PEFT's wrappers are seen through: a tuner layer (a LoRA ``Linear`` holding ``base_layer``,
``lora_A``, ``lora_B``) stands for its base layer, a ``ModulesToSaveWrapper`` (``task_type``'s
classifier head) for its active trained copy, the one ``merge_and_unload`` keeps. Their weights
go by the wrapper's own name (``q_proj.weight``, as the base model and a merged model name
them); adapters and the frozen original of a saved module are never selected by default.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "LayerSpec",
    "inner_layer",
    "is_instance_named",
    "layer_spec",
    "named_layers",
    "reduction_last",
    "register_layer",
    "restore_layout",
    "weight_layout",
]


@dataclass(frozen=True)
class LayerSpec:
    """The matmul weights of a layer type (attribute names) and the dimension of each that
    the layer's matrix multiply reduces over (its input features)."""

    weights: tuple[str, ...]
    reduction_dim: int


_CONV_AND_LINEAR = LayerSpec(("weight",), 1)  # [out, in, *kernel]
_TRANSPOSED_CONV = LayerSpec(("weight",), 0)  # [in, out / groups, *kernel]

_REGISTERED: dict[type[nn.Module], LayerSpec] = {
    nn.Linear: _CONV_AND_LINEAR,
    nn.Conv1d: _CONV_AND_LINEAR,
    nn.Conv2d: _CONV_AND_LINEAR,
    nn.Conv3d: _CONV_AND_LINEAR,
    nn.ConvTranspose1d: _TRANSPOSED_CONV,
    nn.ConvTranspose2d: _TRANSPOSED_CONV,
    nn.ConvTranspose3d: _TRANSPOSED_CONV,
    # [3 * embed, embed] packed, or three [embed, kdim/vdim] when kdim/vdim differ from embed.
    nn.MultiheadAttention: LayerSpec(
        ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"), 1
    ),
}

# Third-party types known by qualified name, so their packages need not be imported.
_BY_NAME: dict[str, LayerSpec] = {
    # GPT-2, DistilGPT-2, OpenAI-GPT, ImageGPT...: y = x @ weight, weight [in, out].
    "transformers.pytorch_utils.Conv1D": LayerSpec(("weight",), 0),
}

# PEFT's tuner-layer base class (its instances wrap a ``base_layer`` and hold adapters), and
# the wrapper of modules trained in full beside the adapters (a trained copy per adapter).
_TUNER_LAYER = "peft.tuners.tuners_utils.BaseTunerLayer"
_MODULES_TO_SAVE = "peft.utils.other.ModulesToSaveWrapper"


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer(
    cls: type[nn.Module], weight: str | Sequence[str] = "weight", reduction_dim: int = 1
) -> None:
    """Make the default selection prune ``cls``'s ``weight`` attribute(s) (parameters), with
    N:M groups along ``reduction_dim`` (the dimension its matrix multiply reduces over: 1 for
    an ``[out, in]`` weight, 0 for ``[in, out]``). Subclasses follow unless registered
    themselves; registering a type again replaces its entry."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be a subclass of torch.nn.Module, got {cls!r}")
    names = (weight,) if isinstance(weight, str) else tuple(weight)
    if not names or not all(isinstance(n, str) and n and "." not in n for n in names):
        raise ValueError(
            f"weight must be an attribute name or a list of them (no dots), got {weight!r}"
        )
    if not isinstance(reduction_dim, int) or isinstance(reduction_dim, bool) or reduction_dim < 0:
        raise ValueError(f"reduction_dim must be a non-negative integer, got {reduction_dim!r}")
    _REGISTERED[cls] = LayerSpec(names, reduction_dim)
    _SPECS.clear()  # a subclass of cls may have resolved to a base's spec


# Each type's resolved spec (a prune step asks per module, and most types match nothing only
# after their whole MRO); emptied by register_layer.
_SPECS: weakref.WeakKeyDictionary[type, LayerSpec | None] = weakref.WeakKeyDictionary()


def layer_spec(module: nn.Module) -> LayerSpec | None:
    """The spec of the nearest registered (or known) class in ``module``'s MRO, or None."""
    cls = type(module)
    try:
        return _SPECS[cls]
    except KeyError:
        spec = _SPECS[cls] = _resolve_spec(cls)
        return spec


def _resolve_spec(cls: type) -> LayerSpec | None:
    for base in cls.__mro__:
        spec = _REGISTERED.get(base)
        if spec is None:
            spec = _BY_NAME.get(_qualified(base))
        if spec is not None:
            return spec
    return None


def is_instance_named(obj: object, qualified_name: str) -> bool:
    """``isinstance`` against a class named ``module.QualName``, without importing its package
    (peft, transformers: optional, and slow to import)."""
    return qualified_name in _class_names(type(obj))


# Qualified names of each class's MRO, computed once per class (a prune step asks per module).
_CLASS_NAMES: weakref.WeakKeyDictionary[type, frozenset[str]] = weakref.WeakKeyDictionary()


def _class_names(cls: type) -> frozenset[str]:
    if torch.compiler.is_compiling():
        # Traced, a cache lookup guards the graph on the cache's size: a class first seen by
        # another model's prune step would recompile this model's compiled apply.
        return frozenset(_qualified(c) for c in cls.__mro__)
    names = _CLASS_NAMES.get(cls)
    if names is None:
        names = _CLASS_NAMES[cls] = frozenset(_qualified(c) for c in cls.__mro__)
    return names


def inner_layer(module: nn.Module) -> nn.Module | None:
    """The layer a PEFT wrapper stands for: a tuner layer's (LoRA, IA3, ...) ``base_layer``,
    a ``ModulesToSaveWrapper``'s active trained copy; None for any other module."""
    # The children are looked up first: a dict lookup, where the class test is not.
    if "base_layer" in module._modules and is_instance_named(module, _TUNER_LAYER):
        return module._modules["base_layer"]
    if "modules_to_save" in module._modules and is_instance_named(module, _MODULES_TO_SAVE):
        active = getattr(module, "active_adapter", None)
        if isinstance(active, (list, tuple)):
            active = active[0] if len(active) == 1 else None
        copies = module._modules.get("modules_to_save")
        if isinstance(copies, nn.ModuleDict) and isinstance(active, str) and active in copies:
            return copies[active]
    return None


def named_layers(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module, bool]]:
    """``(name, module, adapter)`` for every module of ``model`` in pre-order, shared ones each
    time they are reached. The layer a PEFT wrapper stands for (:func:`inner_layer`) takes the
    wrapper's name (its parameters then have the base model's names); the wrapper's children
    keep theirs, with ``adapter`` True for them and everything inside."""
    layers: list[tuple[str, nn.Module, bool]] = []
    # A stack rather than nested generators: a prune step walks every module of the model.
    stack: list[tuple[str, nn.Module, bool]] = [(prefix, model, False)]
    while stack:
        name, module, adapter = stack.pop()
        inner = inner_layer(module)
        children = [
            (_join(name, child_name), child, adapter or inner is not None)
            for child_name, child in module._modules.items()
            if child is not None and child is not inner
        ]
        stack.extend(reversed(children))
        if inner is not None:  # walked first, under the wrapper's name
            stack.append((name, inner, adapter))
        else:
            layers.append((name, module, adapter))
    return layers


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def weight_layout(module: nn.Module, attr: str, ndim: int) -> int:
    """The reduction dimension of ``module.<attr>`` (a tensor of ``ndim`` dimensions): the
    registered one for a matmul weight of a known layer type, else 1 (the ``[out, in, ...]``
    convention of Linear and Conv weights), or 0 for a tensor of fewer than 2 dimensions."""
    spec = layer_spec(module)
    if spec is not None and attr in spec.weights and spec.reduction_dim < ndim:
        return spec.reduction_dim
    return 1 if ndim >= 2 else 0


def _order(ndim: int, dim: int) -> list[int]:
    return [d for d in range(ndim) if d != dim] + [dim]


def reduction_last(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor`` viewed with dimension ``dim`` last and the others in order (a Conv2d weight
    ``[out, in, kh, kw]`` with ``dim=1`` as ``[out, kh, kw, in]``): N:M groups are ``m``
    consecutive elements of its last dimension. ``tensor`` itself when ``dim`` is last."""
    if dim == tensor.dim() - 1:
        return tensor
    return tensor.permute(_order(tensor.dim(), dim))


def restore_layout(view: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of :func:`reduction_last`: ``view`` back in the original dimension order."""
    if dim == view.dim() - 1:
        return view
    order = _order(view.dim(), dim)
    return view.permute([order.index(d) for d in range(view.dim())])
