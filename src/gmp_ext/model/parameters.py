"""Which parameters gmp_ext prunes: the default selection, the name-and-pattern rule, wrappers.

One rule matches a name or pattern against a parameter name everywhere (``params``,
``exclude``, ``layer_sparsity``, ``max_sparsity``, recipes), see :func:`matches`. Names given
for a wrapped model (``DistributedDataParallel``/``DataParallel``'s ``module.``,
``torch.compile``'s ``_orig_mod.``) are accepted with or without the wrappers' prefixes.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Union

from torch import nn
from torch.nn.utils import parametrize

from gmp_ext.exceptions import warn
from gmp_ext.kernels import primitives
from gmp_ext.model.layers import (
    inner_layer,
    is_instance_named,
    layer_spec,
    named_layers,
    weight_layout,
)

__all__ = [
    "ParamSpec",
    "bare_name",
    "check_patterns",
    "matches",
    "named_parameters",
    "owner_of",
    "parameter_by_name",
    "reduction_dims",
    "select_parameters",
    "unwrap",
]

ParamSpec = Union[
    None,
    Sequence[str],
    Sequence[tuple[nn.Module, str]],
    Callable[[str, nn.Parameter], bool],
]


# -- wrappers ----------------------------------------------------------------------------------


def _wrapped_attribute(model: nn.Module) -> str | None:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return "module"
    # PEFT: PeftModel.base_model is the tuner (LoraModel...), whose .model is the user's model.
    if is_instance_named(model, "peft.peft_model.PeftModel"):
        return "base_model"
    if is_instance_named(model, "peft.tuners.tuners_utils.BaseTuner"):
        return "model"
    # torch.compile's OptimizedModule (importing torch._dynamo to check the class is slow).
    if type(model).__name__ == "OptimizedModule" and isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    ):
        return "_orig_mod"
    return None


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The user's model inside DDP / DataParallel / ``torch.compile`` / PEFT wrappers (nested
    in any order), and the prefix they add to its parameter names (``""`` for a plain
    module)."""
    prefix = ""
    attribute = _wrapped_attribute(model)
    while attribute is not None:
        model = getattr(model, attribute)
        prefix += attribute + "."
        attribute = _wrapped_attribute(model)
    return model, prefix


def _prefix_tails(prefix: str) -> list[str]:
    """``"_orig_mod.module."`` -> ``["_orig_mod.module.", "module."]``: each wrapper's view."""
    parts = prefix.split(".")[:-1]
    return [".".join(parts[i:]) + "." for i in range(len(parts))]


def bare_name(name: str, prefix: str, known: Iterable[str] = ()) -> str:
    """A name given for a wrapped model (``module.fc.weight``) as the inner model names it
    (PEFT's ``base_layer.`` steps dropped, see :func:`named_parameters`); names the inner model
    has (``known``) are kept as they are."""
    if name in known:
        return name
    name = name.replace(".base_layer.", ".")
    for tail in _prefix_tails(prefix):
        if name.startswith(tail):
            return name[len(tail) :]
    return name


# -- names and patterns ------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str, strict: bool) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error as error:
        if strict:
            message = f"pattern 're:{pattern}' is not a regular expression: {error}"
            raise ValueError(message) from None
        return None


def matches(pattern: str, name: str) -> bool:
    """The rule for every name or pattern a user gives: ``pattern`` matches the parameter
    ``name`` when it is the name itself, names a module holding it (``"classifier"`` matches
    ``"classifier.weight"``), or, as a regular expression, matches the whole name;
    ``"re:<regex>"`` (SparseML's recipe convention) is only a regular expression."""
    if pattern.startswith("re:"):
        regex = _regex(pattern[3:], True)
        return regex is not None and regex.fullmatch(name) is not None
    if pattern == name or name.startswith(pattern + "."):
        return True
    regex = _regex(pattern, False)
    return regex is not None and regex.fullmatch(name) is not None


def _matches_wrapped(pattern: str, name: str, prefix: str) -> bool:
    return matches(pattern, name) or any(matches(pattern, t + name) for t in _prefix_tails(prefix))


def check_patterns(
    patterns: Iterable[str], names: Sequence[str], what: str, prefix: str = ""
) -> None:
    """ValueError naming the patterns that match none of ``names`` (with or without the
    wrappers' ``prefix``): a typo would otherwise silently change what is pruned."""
    unmatched = [p for p in patterns if not any(_matches_wrapped(p, n, prefix) for n in names)]
    if unmatched:
        shown = list(names[:8]) + (["..."] if len(names) > 8 else [])
        raise ValueError(f"{what} {unmatched} match no parameter name (names: {shown})")


# -- re-parametrized and tied weights ----------------------------------------------------------


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds the parameter ``name`` (a :func:`named_parameters` name) now, and
    its attribute there (KeyError when a module on the path is gone). Walks the module tree's
    registries: ``getattr`` would find methods first for submodules named like them
    (``half``, ``float``, ``train``). A PEFT wrapper on the path is seen through to the layer
    it stands for where it holds no such child itself, so a name stays valid when LoRA wraps a
    layer and again after ``merge_and_unload``."""
    *path, attr = name.split(".")
    module = model
    for part in path:
        module = _base_holding(module, part, "_modules")._modules[part]  # type: ignore[assignment]
    return _base_holding(module, attr, "_parameters"), attr


def _base_holding(module: nn.Module, key: str, registry: str) -> nn.Module:
    """``module``, or the layer the PEFT wrapper ``module`` stands for whose ``registry``
    holds ``key``."""
    inner = inner_layer(module)
    while key not in getattr(module, registry) and inner is not None:
        module, inner = inner, inner_layer(inner)
    return module


def parameter_by_name(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter ``model`` holds now under ``name`` (KeyError when there is none)."""
    module, attr = owner_of(model, name)
    param = module._parameters[attr]
    if param is None:
        raise KeyError(name)
    return param


def _hook_reparametrization(module: nn.Module, attr: str) -> str | None:
    """How a forward pre-hook recomputes ``module.<attr>`` (legacy weight/spectral norm,
    torch.nn.utils.prune), with the call that makes it a plain parameter again."""
    # The modules, not the functions torch.nn.utils exports under the same names.
    legacy_weight = importlib.import_module("torch.nn.utils.weight_norm")
    legacy_spectral = importlib.import_module("torch.nn.utils.spectral_norm")
    prune = importlib.import_module("torch.nn.utils.prune")
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, legacy_weight.WeightNorm) and hook.name == attr:
            return "legacy weight_norm hook; torch.nn.utils.remove_weight_norm(module)"
        if isinstance(hook, legacy_spectral.SpectralNorm) and hook.name == attr:
            return "legacy spectral_norm hook; torch.nn.utils.remove_spectral_norm(module)"
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == attr:
            return (
                f"torch.nn.utils.prune's {attr}_orig * {attr}_mask; "
                f"torch.nn.utils.prune.remove(module, '{attr}')"
            )
    return None


def _reparametrization(module: nn.Module, module_name: str, attr: str = "weight") -> str | None:
    """Why ``module.<attr>`` is not a parameter gmp_ext can mask, or None when it is one."""
    # register_parametrization keeps its ModuleDict among the modules; torch's check looks for
    # it with getattr, whose miss (every plain layer) costs a formatted AttributeError.
    if "parametrizations" in module._modules and parametrize.is_parametrized(module, attr):
        parametrization = module.get_submodule(f"parametrizations.{attr}")
        kinds = ", ".join(type(p).__name__ for p in parametrization.children())
        stored = ", ".join(
            f"'{_join(module_name, f'parametrizations.{attr}.' + n)}'"
            for n, _ in parametrization.named_parameters(recurse=False)
        )
        return (
            f"torch.nn.utils.parametrize {kinds} over {stored}; "
            f"torch.nn.utils.parametrize.remove_parametrizations(module, '{attr}')"
        )
    if isinstance(module._parameters.get(attr), nn.Parameter):
        return None
    reason = _hook_reparametrization(module, attr)
    weight = getattr(module, attr, None)
    if reason is None and weight is not None:
        reason = f"its {attr} is a {type(weight).__name__}, not an nn.Parameter"
    return reason


def _join(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


class _Holders:
    """Every (module, attribute) holding each parameter: a tied tensor has several."""

    def __init__(self, layers: Sequence[tuple[str, nn.Module, bool]]) -> None:
        self.by_id: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for module_name, module, _ in layers:
            for attr, param in module._parameters.items():
                if param is not None:
                    entry = (_join(module_name, attr), module, attr)
                    self.by_id.setdefault(id(param), []).append(entry)

    def names(self, param: nn.Parameter) -> list[str]:
        return [name for name, _, _ in self.by_id.get(id(param), [])]

    def tied(self, param: nn.Parameter) -> bool:
        """Whether more than one (module, attribute) holds ``param``."""
        return len(self.by_id.get(id(param), ())) > 1

    def outside_default(self, param: nn.Parameter) -> list[str]:
        """Names under which ``param`` is held by a module the default selection leaves alone
        (an embedding, a norm, a bias slot)."""
        return [
            f"'{name}' of {type(module).__name__}"
            for name, module, attr in self.by_id.get(id(param), [])
            if not _is_matmul_weight(module, attr)
        ]


# -- selection ---------------------------------------------------------------------------------


def _reparametrized_error(found: list[tuple[str, str]]) -> ValueError:
    listed = "; ".join(f"'{name}' ({reason})" for name, reason in found)
    return ValueError(
        f"cannot prune re-parametrized weights: {listed}. gmp_ext zeroes a parameter's own "
        "storage, and these weights are recomputed from other tensors at every forward, so "
        "their zeros would not hold. Make them plain parameters first (the calls above), or "
        "leave them out with exclude=; to mask a stored tensor itself (its zeros then hold in "
        "the weight, ranked by its own magnitudes), name it in params="
    )


def _is_matmul_weight(module: nn.Module, attr: str) -> bool:
    spec = layer_spec(module)
    return spec is not None and attr in spec.weights


def _default_candidates(
    layers: Sequence[tuple[str, nn.Module, bool]],
) -> tuple[list[tuple[str, nn.Parameter]], list]:
    chosen: list[tuple[str, nn.Parameter]] = []
    reparametrized: list[tuple[str, str]] = []
    for module_name, module, adapter in layers:
        spec = layer_spec(module)
        if spec is None or adapter:
            continue
        for attr in spec.weights:
            name = _join(module_name, attr)
            reason = _reparametrization(module, module_name, attr)
            weight = module._parameters.get(attr) if reason is None else None
            if reason is not None:
                reparametrized.append((name, reason))
            elif weight is not None:
                chosen.append((name, weight))
    return chosen, reparametrized


def named_parameters(
    model: nn.Module, layers: Sequence[tuple[str, nn.Module, bool]] | None = None
) -> dict[str, nn.Parameter]:
    """``model.named_parameters(remove_duplicate=False)``, but a PEFT tuner layer's base
    weights under the tuner layer's name (``q_proj.weight``, not ``q_proj.base_layer.weight``):
    the names of the base model, and of the model ``merge_and_unload`` returns. ``layers``:
    ``named_layers(model)`` when the caller has it."""
    return {
        _join(module_name, attr): param
        for module_name, module, _ in (named_layers(model) if layers is None else layers)
        for attr, param in module._parameters.items()
        if param is not None
    }


def reduction_dims(model: nn.Module, names: Sequence[str]) -> list[int]:
    """The reduction (input) dimension of each named parameter of ``model`` (unwrapped): the
    one its layer type registers (:func:`gmp_ext.register_layer`), else 1 (``[out, in, ...]``)
    for a tensor of 2 or more dimensions and 0 for one of fewer."""
    dims = []
    for name in names:
        module, attr = owner_of(model, name)
        param = module._parameters[attr]
        dims.append(weight_layout(module, attr, 0 if param is None else param.dim()))
    return dims


def _module_reparametrization(model: nn.Module, name: str) -> str | None:
    """The re-parametrization of ``<module>.weight`` when ``name`` is such a weight."""
    module_name, _, attr = name.rpartition(".")
    if attr != "weight":
        return None
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return _reparametrization(module, module_name)


def _from_names(
    model: nn.Module, entries: Sequence[object], named: dict[str, nn.Parameter]
) -> list[tuple[str, nn.Parameter]]:
    module_names = {id(m): n for n, m, _ in named_layers(model)}
    chosen: list[tuple[str, nn.Parameter]] = []
    reparametrized: list[tuple[str, str]] = []
    for item in entries:
        if isinstance(item, str):
            hits = [(n, p) for n, p in named.items() if matches(item, n)]
            reason = _module_reparametrization(model, item)
            if reason is not None and not hits:
                reparametrized.append((item, reason))
            elif not hits:
                raise ValueError(f"params entry {item!r} matches no parameter of the model")
            chosen += hits
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], nn.Module):
            module, attr = item
            if id(module) not in module_names:
                raise ValueError(
                    f"params entry ({type(module).__name__}, {attr!r}): "
                    "the module is not part of the model"
                )
            name = _join(module_names[id(module)], attr)
            param = dict(module.named_parameters(recurse=False)).get(attr)
            reason = (
                _reparametrization(module, name[: -len(attr) - 1]) if attr == "weight" else None
            )
            if reason is not None:
                reparametrized.append((name, reason))
            elif not isinstance(param, nn.Parameter):
                raise ValueError(
                    f"params entry ({type(module).__name__}, {attr!r}) names no parameter"
                )
            else:
                chosen.append((name, param))
        else:
            raise TypeError(f"params entries must be names or (module, name) pairs, got {item!r}")
    if reparametrized:
        raise _reparametrized_error(reparametrized)
    return chosen


def select_parameters(
    model: nn.Module, params: ParamSpec = None, exclude: Sequence[str] | str | None = None
) -> dict[str, nn.Parameter]:
    """The parameters gmp_ext prunes, by name, each tensor once (a tied tensor under its first
    name).

    ``params=None`` (the default selection): every weight that carries a matrix multiply, by
    layer type (:mod:`gmp_ext.model.layers`): the ``weight`` of ``nn.Linear``, ``nn.Conv1d/2d/3d``,
    ``nn.ConvTranspose1d/2d/3d`` and transformers' ``Conv1D``, ``nn.MultiheadAttention``'s
    input projections (``in_proj_weight`` or ``q/k/v_proj_weight``; ``out_proj`` is a Linear),
    and those of types added with :func:`gmp_ext.register_layer`; never biases, norms or
    embeddings. On a PEFT model the base layers' weights, under the base model's names, never
    the adapters. A weight tied to a module outside that list (an output layer sharing the
    embedding matrix, as in most language models) is left out, with a :class:`GMPWarning`;
    name it in ``params`` to prune it. A re-parametrized weight
    (``torch.nn.utils.parametrize``, the legacy ``weight_norm``/``spectral_norm`` hooks,
    ``torch.nn.utils.prune``) is a ValueError naming every such layer and the call that makes
    it a plain parameter, unless ``exclude`` leaves it out: masking it would not keep its
    zeros.

    ``params`` may list names or patterns (the rule of :func:`matches`; each must match), or
    ``(module, "weight")`` pairs like ``torch.nn.utils.prune``, or be a predicate ``(name,
    param) -> bool``. ``exclude`` takes names or patterns (the same rule; each must match a
    parameter of the model) and drops a tensor whichever of its tied names it matches.
    Raises TypeError for a non-Module ``model`` or a non-floating parameter, ValueError when
    nothing is left to prune.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model, prefix = unwrap(model)
    layers = named_layers(model)  # one walk of the module tree for every use below
    patterns = [exclude] if isinstance(exclude, str) else list(exclude or [])
    # Names are matched only against params= and exclude= (a prune step's default has neither).
    named = named_parameters(model, layers) if params is not None or patterns else {}
    holders = _Holders(layers)
    reparametrized: list[tuple[str, str]] = []
    if params is None:
        chosen, reparametrized = _default_candidates(layers)
    elif callable(params):
        chosen = [(n, p) for n, p in named.items() if params(n, p)]
    elif isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
        raise TypeError(
            "params must be None, a list of parameter names or patterns, a list of (module, "
            f"name) pairs or a predicate (name, param) -> bool, got {params!r}"
        )
    else:
        entries = [bare_name(p, prefix, named) if isinstance(p, str) else p for p in params]
        chosen = _from_names(model, entries, named)

    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"exclude must be a name or pattern, or a list of them, got {exclude!r}")
    check_patterns(patterns, [*named, *(n for n, _ in reparametrized)], "exclude entries", prefix)

    def excluded(names: Iterable[str]) -> bool:
        return any(_matches_wrapped(p, n, prefix) for p in patterns for n in names)

    reparametrized = [(n, r) for n, r in reparametrized if not excluded([n])]
    if reparametrized:
        raise _reparametrized_error(reparametrized)

    selected: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    tied_out: list[str] = []
    for name, param in chosen:
        if id(param) in seen or (patterns and excluded([name, *holders.names(param)])):
            continue
        seen.add(id(param))
        # A default candidate held once is held by the matmul layer it was chosen from.
        others = holders.outside_default(param) if params is None and holders.tied(param) else []
        if others:
            tied_out.append(f"'{name}' (also {', '.join(others)})")
            continue
        selected[name] = param
    if tied_out:
        warn(
            f"tied weights left out of the default selection: {'; '.join(tied_out)}. The "
            "default selection never prunes embeddings or norms, nor the tensors they share; "
            "to prune one, name it in params="
        )
    if not selected:
        why = (
            "the model has no matmul weight of a known layer type (nn.Linear, nn.Conv*, "
            "nn.ConvTranspose*, nn.MultiheadAttention, transformers' Conv1D, or a type "
            "registered with gmp_ext.register_layer(cls, weight=..., reduction_dim=...))"
        )
        if params is not None:
            why = "`params` selects no parameter"
        if patterns:
            why += " left after `exclude`"
        if tied_out:
            why += " that is not tied to an embedding or norm"
        raise ValueError(f"no prunable parameter selected: {why}; pass `params=` to choose some")
    for name, param in selected.items():
        primitives.check_tensor(param, f"parameter '{name}'")
        if not param.is_floating_point():
            raise TypeError(f"parameter '{name}' is not floating point ({param.dtype})")
    return selected
