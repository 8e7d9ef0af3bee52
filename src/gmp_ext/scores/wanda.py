"""Wanda: |w| times the norm of the input feature it multiplies (Sun et al., 2023).

Sun, Liu, Bair and Kolter, "A Simple and Effective Pruning Approach for Large Language Models"
(arXiv 2306.11695): the score of weight ``W[i, j]`` is ``|W[i, j]| * ||X_j||_2``, the norm of
input feature ``j`` over every token the layer saw. Forward pre-hooks on the layers that own the
pruned weights accumulate each feature's sum of squares (float32, a vector per layer) over the
forward passes since the last update (training batches under :class:`gmp_ext.GMP`), or over a
calibration set (``prune_step(..., score="wanda", calibration=batches)``). Attached for
training (with an optimizer, as GMP attaches it), the hooks count only passes of modules in
training mode, so evaluation passes between updates leave the norms alone; attached without
one (calibration), every pass counts. Every input row counts, padding included. The norms are
the score's factors (``scaled``): the kernels multiply each |w| by its feature's norm as they
read the weights, so a step needs no weight-sized score buffer.

Input features by layer type: the last dimension of a Linear's (and transformers' ``Conv1D``'s)
input, the channel dimension (1) of a ConvNd's or ConvTranspose's. A grouped convolution and
``nn.MultiheadAttention``'s packed input projection have no one input vector per weight column
and are refused by name (exclude them, or rank them by magnitude).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gmp_ext.model.layers import weight_layout
from gmp_ext.model.parameters import owner_of, unwrap
from gmp_ext.scores.base import KeyScale, Score, register_score

__all__ = ["Wanda"]

_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


@register_score
class Wanda(Score):
    """``|w| * ||x_j||``, with input norms accumulated by forward hooks (see the module)."""

    name = "wanda"
    scaled = True  # the kernels multiply |w| by the input norms as they read the weights

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}  # {parameter: sum of squares per feature}
        self._dims: dict[str, int] = {}  # {parameter: its reduction dimension}
        self.tokens = 0  # rows of input seen in this window, by the first hooked layer
        self._first: str | None = None

    def attach(
        self, model: nn.Module, names: Sequence[str], optimizer: torch.optim.Optimizer | None = None
    ) -> list[Any]:
        inner = unwrap(model)[0]
        training_only = optimizer is not None
        handles = []
        owners: dict[int, list[str]] = {}
        modules: dict[int, nn.Module] = {}
        for name in names:
            _refuse_attention_output(inner, name)
            module, attr = owner_of(inner, name)
            weight = module._parameters[attr]
            assert weight is not None
            self._dims[name] = _feature_dim_of(name, module, attr, weight)
            owners.setdefault(id(module), []).append(name)
            modules[id(module)] = module
        for key, module in modules.items():
            hook = self._hook(owners[key], training_only)
            handles.append(module.register_forward_pre_hook(hook))
        self._first = names[0] if names else None
        return handles

    def _hook(self, names: list[str], training_only: bool) -> Any:
        def observe(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            if training_only and not module.training:
                return
            x = args[0].detach()
            if isinstance(module, _CONVS):  # channels before the spatial dims, batched or not
                x = x.movedim(x.dim() - len(module.kernel_size) - 1, -1)
            flat = x.reshape(-1, x.shape[-1]).float()
            sums = flat.square().sum(0)
            for name in names:  # each weight its own sums (a state may be loaded per name)
                total = self._sums.get(name)
                if total is None:
                    self._sums[name] = sums.clone()
                else:  # a state loaded elsewhere (map_location) moves to the inputs' device
                    self._sums[name] = total.to(sums.device).add_(sums)
            if names[0] == self._first:
                self.tokens += flat.shape[0]

        return observe

    def factors(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> list[KeyScale]:
        scales = []
        for name, param in zip(names, params):
            sums = self._sums.get(name)
            if sums is None:
                raise ValueError(
                    f"score 'wanda' has seen no input to parameter '{name}': run forward passes "
                    "after the score is attached (GMP does; prune_step takes calibration=batches)"
                )
            dim = self._dims[name]
            if sums.numel() != param.shape[dim]:
                raise ValueError(
                    f"score 'wanda': parameter '{name}' of shape {tuple(param.shape)} takes "
                    f"{param.shape[dim]} input features along dimension {dim}, but its layer saw "
                    f"inputs of {sums.numel()}"
                )
            scales.append(KeyScale(sums.to(param.device).sqrt(), dim))
        return scales

    def reset(self) -> None:
        self._sums.clear()
        self.tokens = 0

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {n: s.clone() for n, s in self._sums.items()}, "tokens": self.tokens}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._sums = {n: s.clone() for n, s in state.get("sums", {}).items()}
        self.tokens = int(state.get("tokens", 0))


def _feature_dim_of(name: str, module: nn.Module, attr: str, weight: torch.Tensor) -> int:
    """The weight dimension that input features index, or ValueError naming the layer."""
    if isinstance(module, nn.MultiheadAttention):
        raise ValueError(
            f"score 'wanda' cannot rank parameter '{name}': nn.MultiheadAttention's input "
            "projections see three inputs (query, key, value); exclude it or prune it by magnitude"
        )
    if isinstance(module, _CONVS) and module.groups != 1 and not module.transposed:
        raise ValueError(
            f"score 'wanda' cannot rank parameter '{name}': a grouped convolution (groups="
            f"{module.groups}) has no single input vector per weight column"
        )
    return weight_layout(module, attr, weight.dim())


def _refuse_attention_output(model: nn.Module, name: str) -> None:
    """nn.MultiheadAttention multiplies by ``out_proj.weight`` without calling ``out_proj``, so
    no hook sees that layer's input: refuse it by name rather than fail for want of inputs."""
    path = name.split(".")[:-2]
    parent = model.get_submodule(".".join(path)) if path else model
    if isinstance(parent, nn.MultiheadAttention):
        raise ValueError(
            f"score 'wanda' cannot rank parameter '{name}': nn.MultiheadAttention applies its "
            "out_proj without calling it, so its input is never seen; exclude it or prune it by "
            "magnitude"
        )
