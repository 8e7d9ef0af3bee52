"""The mask store: packed masks of a model's pruned parameters, kept beside the model.

Masks live in a weak mapping keyed by the model, never as module buffers or parameters, so
``model.state_dict()`` keys never change and a pruned model loads into a plain one.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from gmp_ext.kernels import library, ops, primitives
from gmp_ext.kernels.dtensors import is_dtensor, local_tensor
from gmp_ext.kernels.engine import UNSTRUCTURED, PreparedStep, StepPattern
from gmp_ext.kernels.layout import KeyScale, mask_storage_bytes
from gmp_ext.model.parameters import owner_of, unwrap

__all__ = [
    "MaskEntry",
    "MaskStore",
    "ensure_store",
    "find_store",
    "get_store",
    "inner_stores",
    "maskable",
]


@dataclass
class MaskEntry:
    """One pruned parameter: the tensor, its packed keep-mask, and the last selection."""

    param: nn.Parameter
    mask: torch.Tensor  # uint8, ops mask storage layout
    target: float = 0.0  # the sparsity asked for at the last update
    threshold: float = 0.0  # |w| of the last pruned element at the last update

    @property
    def numel(self) -> int:
        """Elements the mask covers: the parameter's, or its local shard's for a DTensor."""
        return local_tensor(self.param).numel()

    def kept(self) -> int:
        return primitives.popcount(self.mask, self.numel)

    def sparsity(self) -> float:
        """Fraction of the parameter's elements the mask prunes (of a DTensor: in this rank's
        shard; ``prune_step`` returns the whole tensor's)."""
        return 1.0 - self.kept() / self.numel if self.numel else 0.0


@dataclass
class MaskStore:
    """The masks of one model's pruned parameters, by the model's parameter names, and the
    hooks and controller that keep them applied."""

    entries: dict[str, MaskEntry] = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    # The model the names refer to (weakly: the store must not keep it alive).
    model: weakref.ReferenceType[nn.Module] | None = None
    # The live GMP controller and attach() handles by optimizer, so none is registered twice.
    controller: weakref.ReferenceType | None = None
    attachments: dict[int, object] = field(default_factory=dict)
    # Removes the store from the registry when the model is collected.
    finalizer: weakref.finalize | None = field(default=None, repr=False, compare=False)
    # Prepared steps kept for reuse: the per-step re-apply by device, prune steps by
    # (names, scope, key space). Each is prepared again when its binding changes.
    _apply_steps: dict[torch.device, PreparedStep] = field(default_factory=dict)
    _prune_steps: dict[tuple, PreparedStep] = field(default_factory=dict)
    # name -> (module holding the parameter, attribute), valid while no module or parameter
    # was registered anywhere since _REGISTRATIONS[0] was _resolved_at.
    _owners: dict = field(default_factory=dict)
    _resolved_at: int = -1

    def resolve(self, skip: Iterable[str] = ()) -> None:
        """Bind every entry (but those in ``skip``) to the parameter the model holds under its
        name now: ``load_state_dict(..., assign=True)``, ``module.weight = nn.Parameter(...)``
        or ``.to()`` with ``torch.__future__.set_overwrite_module_params_on_conversion(True)``
        replace parameter objects, and a mask must follow the model, never the orphaned tensor.
        The mask moves with a parameter moved to another device. Raises ValueError, binding
        nothing, when a name is gone or its parameter changed shape."""
        model = None if self.model is None else self.model()
        if model is None:
            return
        skipped = set(skip)
        # Registering a module or a parameter anywhere invalidates every cached owner; between
        # registrations only a direct write to a holder's registry (``.to()`` with overwrite,
        # FSDP) replaces a parameter, which the holder check sees. Under torch.compile the walk
        # itself is guarded, and reading the counter would recompile whenever a module is made.
        compiling = torch.compiler.is_compiling()
        fresh = compiling or self._resolved_at != _REGISTRATIONS[0]
        rebound: list[tuple[MaskEntry, nn.Parameter]] = []
        owners: dict[str, tuple[nn.Module, str]] = {}
        for name, entry in self.entries.items():
            if name in skipped:
                continue
            cached = None if fresh else self._owners.get(name)
            if cached is not None and cached[0]._parameters.get(cached[1]) is entry.param:
                owners[name] = cached
                continue
            current: nn.Parameter | None = None
            try:
                owner = owner_of(model, name)
                current = owner[0]._parameters[owner[1]]
            except KeyError:
                pass
            if current is None:
                raise ValueError(
                    f"the model no longer has the parameter '{name}' that gmp_ext masks; "
                    "gmp_ext.remove(model) drops every mask"
                )
            owners[name] = owner
            if current is entry.param:
                continue
            old, new = local_tensor(entry.param), local_tensor(current)
            if current.shape != entry.param.shape or old.shape != new.shape:
                raise ValueError(
                    f"parameter '{name}' was replaced by one of shape {list(new.shape)}, but its "
                    f"mask covers {list(old.shape)}: prune it again (prune_step) or drop the "
                    "masks (gmp_ext.remove(model))"
                )
            rebound.append((entry, current))
        if not compiling:
            self._owners = owners
            self._resolved_at = _REGISTRATIONS[0]
        for entry, current in rebound:
            entry.param = current
            device = local_tensor(current).device
            if entry.mask.device != device:
                entry.mask = entry.mask.to(device)
        if rebound:  # the steps would hold (and keep alive) the replaced tensors
            self._apply_steps.clear()
            self._prune_steps.clear()

    def reusable_mask(self, name: str, param: torch.Tensor) -> torch.Tensor | None:
        """The mask held for ``param`` under ``name`` when a new mask may be written over it
        (same parameter, device and size), so a repeated prune step allocates no masks."""
        entry = self.entries.get(name)
        if entry is None or entry.param is not param:
            return None
        local = local_tensor(param)
        if entry.mask.device != local.device or entry.mask.numel() != mask_storage_bytes(
            local.numel()
        ):
            return None
        return entry.mask

    def set_masks(self, entries: dict[str, MaskEntry]) -> None:
        # The apply steps are prepared again only if the binding changed: a prune step that
        # wrote new bits over the same masks keeps them.
        self.entries.update(entries)

    def prune_step(
        self,
        names: Sequence[str],
        tensors: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        scope: str,
        key_space: int,
        pattern: StepPattern = UNSTRUCTURED,
        ranked: Sequence[torch.Tensor] | None = None,
        scales: Sequence[KeyScale | None] | None = None,
    ) -> PreparedStep:
        """The prepared select -> build step of these parameters and masks (with the strategy's
        ``pattern``), made once and reused while they keep their storage (a repeated prune step
        builds no tables); ranking a score's ``ranked`` tensors or ``scales``, a step for this
        call only."""
        if ranked is not None or scales is not None:  # a score's values are new at every call
            return PreparedStep(tensors, masks, scope, key_space, pattern, ranked, scales)
        key = (tuple(names), scope, key_space, pattern)
        step = self._prune_steps.get(key)
        if step is None or step.key != PreparedStep.binding(tensors, masks):
            step = PreparedStep(tensors, masks, scope, key_space, pattern)
            self._prune_steps[key] = step
        return step

    def apply(self) -> None:
        """Re-zero every pruned weight: one fused native call per device.

        Entries are first bound to the model's current parameters (:meth:`resolve`). The table
        of pointers is cached per device and rebuilt only when a parameter's storage moved
        (``.to()``, ``load_state_dict``, FSDP resharding); a DTensor's local shard is looked up
        on every call.
        """
        self.resolve()
        with torch.no_grad():
            by_device: dict[torch.device, list[MaskEntry]] = {}
            for entry in self.entries.values():
                by_device.setdefault(entry.param.device, []).append(entry)
            for device, entries in by_device.items():
                self._apply_device(device, entries)

    def _apply_device(self, device: torch.device, entries: list[MaskEntry]) -> None:
        # A non-contiguous parameter (channels_last) is staged through a contiguous copy kept
        # with the step, so a step allocates nothing and builds no table (and can be captured
        # in a CUDA graph); the mask, in flat index order, needs no permutation.
        masks = [e.mask if e.mask.device == device else e.mask.to(device) for e in entries]
        if torch.compiler.is_compiling():
            # Dynamo cannot trace a step's binding (raw addresses); the operator takes the
            # parameters themselves (detached aliases would be graph inputs sharing storage).
            library.apply_masks([local_tensor(e.param) for e in entries], masks)
            return
        params = [local_tensor(e.param).detach() for e in entries]
        step = self._apply_steps.get(device)
        if step is None or step.key != PreparedStep.binding(params, masks):
            step = self._apply_steps[device] = PreparedStep(params, masks)
        step.run(select=False, build=False)

    def apply_to(
        self,
        tensors_of: Callable[[MaskEntry], Iterable[object]],
        names: Iterable[str] | None = None,
        *,
        required: str | None = None,
    ) -> int:
        """Zero, in the tensors tied to each parameter (its gradient, its optimizer state), the
        elements its mask prunes: one fused call per device for the dense ones; a sparse COO
        tensor's stored values are masked in place (:func:`primitives.apply_sparse_in_place`).

        ``tensors_of(entry)`` names the candidates of one entry (of the entries ``names``
        lists, default all); only those :func:`maskable` accepts are masked, the others (a
        scalar ``step``, factored rows, integer buffers) are left alone, unless ``required``
        says what the candidates are (``"gradient"``): then each must be masked, and one that
        cannot be is a ValueError naming the parameter and the tensor's layout, raised before
        anything is modified. Returns how many tensors were masked.
        """
        self.resolve()
        chosen = list(self.entries) if names is None else list(names)
        targets: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        sparse: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name in chosen:
            entry = self.entries[name]
            moved: dict[torch.device, torch.Tensor] = {entry.mask.device: entry.mask}
            for tensor in tensors_of(entry):
                local = maskable(entry.param, tensor)
                if local is None:
                    if required is None:
                        continue
                    raise ValueError(_unmaskable(required, name, entry.param, tensor))
                if local.device not in moved:  # e.g. optimizer state offloaded to the CPU
                    moved[local.device] = entry.mask.to(local.device)
                if local.layout == torch.sparse_coo:
                    sparse.append((local, moved[local.device]))
                else:
                    targets.append(local)
                    masks.append(moved[local.device])
        if targets:
            primitives.apply_in_place(targets, masks)
        for tensor, mask in sparse:
            primitives.apply_sparse_in_place(tensor, mask)
        return len(targets) + len(sparse)

    def replace_controller(self, controller: object, optimizer: object) -> object | None:
        """Make ``controller`` (driven by ``optimizer``) the model's one controller; returns the
        live one it replaces, if any. attach() hooks on the same optimizer are removed: the
        controller re-applies the masks itself."""
        previous = None if self.controller is None else self.controller()
        attached = self.attachments.pop(id(optimizer), None)
        if attached is not None:
            attached.remove()  # type: ignore[attr-defined]
        self.controller = weakref.ref(controller)
        return None if previous is controller else previous

    def release_controller(self, controller: object) -> None:
        if self.controller is not None and self.controller() is controller:
            self.controller = None

    def remove_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()


def maskable(param: torch.Tensor, tensor: object) -> torch.Tensor | None:
    """The storage to mask of ``tensor`` (a DTensor's local shard) if it is tied element for
    element to ``param``: a dense floating tensor of a dtype gmp_ext supports, shaped like the
    parameter (a DTensor: sharded like it, so its local shard is shaped like the parameter's),
    or such a sparse COO tensor (e.g. ``nn.Embedding(sparse=True)``'s gradient), returned as
    is, of a parameter that is not a DTensor; None otherwise."""
    if (
        not isinstance(tensor, torch.Tensor)
        or tensor.layout not in (torch.strided, torch.sparse_coo)
        or tensor.dtype not in ops.SUPPORTED_DTYPES
        or tensor.device.type == "meta"
        or tensor.shape != param.shape
    ):
        return None
    sharded = is_dtensor(param)
    if tensor.layout == torch.sparse_coo:
        # Its stored values are masked where they lie: a DTensor holds no sparse shard here.
        if sharded or is_dtensor(tensor) or _expanded(tensor._values()):
            return None
        return tensor
    if is_dtensor(tensor) != sharded:
        return None
    if sharded and (
        tensor.device_mesh != param.device_mesh  # type: ignore[attr-defined]
        or tuple(tensor.placements) != tuple(param.placements)  # type: ignore[attr-defined]
    ):
        return None
    local = local_tensor(tensor)
    if local.shape != local_tensor(param).shape or _expanded(local):
        return None
    return local


def _expanded(tensor: torch.Tensor) -> bool:
    """An expanded tensor (stride 0) has no element of its own to zero."""
    return any(stride == 0 and size > 1 for stride, size in zip(tensor.stride(), tensor.shape))


def _unmaskable(what: str, name: str, param: torch.Tensor, tensor: object) -> str:
    """Why :func:`maskable` refused the ``what`` of parameter ``name``: the tensor as found and
    what gmp_ext masks."""
    if isinstance(tensor, torch.Tensor):
        kind = "DTensor" if is_dtensor(tensor) else "tensor"
        found = f"a {kind} of layout {tensor.layout}, dtype {tensor.dtype}, shape "
        found += f"{list(tensor.shape)} on {tensor.device}"
        if tensor.layout == torch.strided:
            found += f", strides {tensor.stride()}"
    else:
        found = f"a {type(tensor).__name__}"
    of = "DTensor parameter" if is_dtensor(param) else "parameter"
    return (
        f"cannot mask the {what} of {of} '{name}' ({param.dtype}, shape {list(param.shape)}) "
        f"exactly: it is {found}. gmp_ext masks dense (strided) tensors shaped (of a DTensor: "
        "sharded) like the parameter with no expanded (stride 0) dimension, and sparse COO "
        "ones (not of DTensor parameters); nothing was modified"
    )


# The stores by id(model). A plain dict, so that a lookup under torch.compile is guarded on its
# one key (Dynamo guards a weak mapping's lookup on every key by position, which breaks when a
# model dies mid-compile); an entry leaves with its model (weakref.finalize) or drop_store.
_STORES: dict[int, MaskStore] = {}


def _own_store(model: nn.Module) -> MaskStore | None:
    store = _STORES.get(id(model))
    # The finalizer drops a dead model's entry before its id can be reused; checked anyway.
    if store is None or store.model is None or store.model() is not model:
        return None
    return store


# Counts module and parameter registrations in the process (``module.weight = Parameter``,
# ``load_state_dict(assign=True)``, ``model.fc = nn.Linear(...)``): a store re-walks the module
# tree to its parameters only after one.
_REGISTRATIONS = [0]


def _count_registration(*_args: object) -> None:
    _REGISTRATIONS[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def _nesting(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The model whose store masks ``model``'s parameters when that is an enclosing model, and
    ``model``'s name prefix in it; None when no enclosing model has a store."""
    for store in list(_STORES.values()):
        root = None if store.model is None else store.model()
        if root is None or root is model:
            continue
        for name, module in root.named_modules(remove_duplicate=False):
            if module is model and name:
                return root, name + "."
    return None


def find_store(model: nn.Module) -> tuple[MaskStore, str] | None:
    """For reading masks: the store holding ``model``'s masks (its own, or an enclosing
    model's when ``model`` is a submodule of a pruned model) and ``model``'s name prefix in it
    (``""`` for its own), or None when nothing masks it."""
    model, _ = unwrap(model)
    store = _own_store(model)
    if store is not None:
        return store, ""
    nested = _nesting(model)
    return None if nested is None else (_STORES[id(nested[0])], nested[1])


def inner_stores(model: nn.Module) -> list[tuple[MaskStore, str]]:
    """The stores held by submodules of ``model`` (a pruned model wrapped in a larger one, e.g.
    ``nn.Sequential(pruned, head)``), each with that submodule's name prefix in ``model``."""
    model, _ = unwrap(model)
    found = []
    for name, module in model.named_modules():
        # A wrapped submodule (torch.compile's) is reached again as the module it wraps: its
        # store is found there, once, under the names the model's parameters have.
        store = _own_store(module) if name else None
        if store is not None:
            found.append((store, name + "."))
    return found


def get_store(model: nn.Module, create: bool = False) -> MaskStore | None:
    """The model's own mask store (created on demand when ``create``); wrappers (DDP,
    DataParallel, torch.compile) share the store of the model they wrap.

    Creating a store for a submodule of a pruned model, or for a model one of whose
    submodules holds a store, is a ValueError: the same parameter would have two masks.
    """
    model, _ = unwrap(model)
    store = _own_store(model)
    if store is None and create:
        nested = _nesting(model)
        if nested is not None:
            raise ValueError(
                f"this module is '{nested[1][:-1]}' of a model whose masks gmp_ext holds; "
                "prune, attach and control that model (params= and exclude= choose layers)"
            )
        inner = [
            n
            for n, m in model.named_modules(remove_duplicate=False)
            if n and _own_store(m) is not None
        ]
        if inner:
            raise ValueError(
                f"submodule '{inner[0]}' of this model already holds gmp_ext masks; keep "
                "using it, or drop them first with "
                f"gmp_ext.remove(model.get_submodule({inner[0]!r}))"
            )
        store = _STORES[id(model)] = MaskStore(model=weakref.ref(model))
        store.finalizer = weakref.finalize(model, _STORES.pop, id(model), None)
    return store


def ensure_store(model: nn.Module) -> MaskStore:
    """The model's own mask store, created on demand (see :func:`get_store`)."""
    store = get_store(model, create=True)
    assert store is not None  # create=True never answers None
    return store


def drop_store(model: nn.Module) -> MaskStore | None:
    model = unwrap(model)[0]
    store = _own_store(model)
    if store is not None:
        del _STORES[id(model)]
        if store.finalizer is not None:
            store.finalizer.detach()
    return store
