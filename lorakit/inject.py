"""The public operations on a model: add, activate, scale, route, merge, unload and delete adapters.

Adapters live in :class:`~lorakit.hosts.host.HostLayer` modules that replace the targeted layers in place, so
any model (transformers or plain PyTorch) keeps its own class and code. The model remembers each adapter's
config in ``model._lorakit_configs``. A method whose layers share state (random bases, shard pools) gets one
:class:`~lorakit.methods.base.SharedState` per adapter, registered on the model as ``lorakit_shared.<name>``.
Modules a config lists in ``modules_to_save`` are replaced by :class:`~lorakit.modules_to_save.SavedModule`
wrappers holding a trainable copy per adapter; every operation here keeps them in step with the host layers.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence, TypeVar

import torch
from torch import nn

from .config import AdapterConfig
from .errors import LorakitError, require
from .hosts.host import HostLayer, hosts
from .methods.base import METHODS, Adapter, SharedState
from .modules_to_save import SavedModule, check_active, inside, resolve, saved_modules, saved_paths
from .routing.rows import RowRouting
from .routing.strategy import Routing
from .routing.weighted import WeightedRouting
from .targeting import find_targets

R = TypeVar("R", bound=Routing)


def configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """The adapters on ``model``: name -> config (empty when none)."""
    return model.__dict__.setdefault("_lorakit_configs", {})


SHARED = "lorakit_shared"
ROUTERS = "lorakit_routers"  # routers of weighted routing (see lorakit.mixing), trained and saved like shared state
POOL = "_lorakit_pool"  # key, in ``model.__dict__``, of the model's AdapterPool (see lorakit.pool)


def shared_states(model: nn.Module) -> dict[str, SharedState]:
    """Adapter name -> its shared state, for the adapters whose method has one."""
    container = model._modules.get(SHARED)
    return dict(container.items()) if container is not None else {}


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """Router name -> router module, for the routers added with :func:`lorakit.mixing.add_router`."""
    container = model._modules.get(ROUTERS)
    return dict(container.items()) if container is not None else {}


def drop_entry(model: nn.Module, container_name: str, name: str | None) -> None:
    """Remove entry ``name`` (``None``: all of them) of the model's container ``container_name`` (shared states,
    routers) and the container once it is empty."""
    container = model._modules.get(container_name)
    if container is None:
        return
    if name is not None and name in container:
        del container[name]
    if name is None or not len(container):
        del model._modules[container_name]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def config_of(model: nn.Module, name: str) -> AdapterConfig:
    """The config of adapter ``name``; a clear error listing the model's adapters when there is none."""
    _check_names(model, [name])
    return configs(model)[name]


def _check_routable(model: nn.Module, names: Sequence[str]) -> None:
    """Each name is an attached adapter or one resident in the slots of the model's AdapterPool."""
    pool = model.__dict__.get(POOL)
    if pool is None:
        return _check_names(model, names)
    known, in_slots = configs(model), pool.in_slots()
    for name in names:
        if name in known or name in in_slots:
            continue
        if name in pool.names():
            raise LorakitError(f"adapter {name!r} is registered in the AdapterPool but not resident; "
                               "pool.acquire([name]) it before routing rows to it")
        raise LorakitError(f"unknown adapter {name!r}; this model has: {sorted(set(known) | in_slots) or 'none'}")


def _check_names(model: nn.Module, names: Sequence[str]) -> None:
    known = configs(model)
    for name in names:
        if name not in known:
            raise LorakitError(f"unknown adapter {name!r}; this model has: {sorted(known) or 'none'}")


def build_adapters(model: nn.Module, config: AdapterConfig, dtype: torch.dtype | None = None,
               ) -> tuple[list[tuple[str, nn.Module, HostLayer, Adapter]], SharedState | None]:
    """Build (without attaching) the adapter of every target, plus the method's shared state if it has one.

    Modules to save (the model's and this config's ``modules_to_save``) and their insides are never targets."""
    adapter_cls, _ = METHODS.get(config.method)
    saved = saved_paths(model) + ([p for p, _ in resolve(model, config.modules_to_save)]
                                  if config.modules_to_save else [])
    found = [(path, module) for path, module in find_targets(model, config) if not inside(path, saved)]
    if not found:
        raise LorakitError(f"targets={config.targets!r}: every module they match is a module to save or lies inside "
                           f"one ({sorted(saved)}); adapters never target those")
    targets = [(path, module, module if isinstance(module, HostLayer) else HostLayer(module, path))
               for path, module in found]
    for path, _, host in targets:
        _check_kind(adapter_cls, config, host, path)
    shared = adapter_cls.shared_state(config, [host.geometry for _, _, host in targets])
    if shared is not None:
        w = targets[0][2].backend.weight()
        shared.to(device=w.device, dtype=dtype or (w.dtype if w.is_floating_point() else None))
    built = []
    for path, module, host in targets:
        extra = {} if shared is None else {"shared": shared}
        adapter = adapter_cls(host.geometry, config.for_module(path), host.backend, **extra)
        if dtype is not None:
            adapter.to(dtype)
        built.append((path, module, host, adapter))
    return built, shared


def _check_kind(adapter_cls: type[Adapter], config: AdapterConfig, host: HostLayer, path: str) -> None:
    kind = host.geometry.kind
    if kind not in adapter_cls.capabilities.layers:
        raise LorakitError(
            f"method {config.method!r} does not support {kind} layers ({path!r} is a "
            f"{type(host.base_layer).__name__}); it supports: {sorted(adapter_cls.capabilities.layers)}"
        )


def adapt(
    model: nn.Module,
    config: AdapterConfig,
    name: str = "default",
    *,
    activate: bool = True,
    freeze_base: bool = True,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Add adapter ``name`` (method and targets from ``config``) to ``model`` in place and return the model.

    Args:
        activate: make ``name`` the only active adapter.
        freeze_base: mark every parameter that no adapter declares trainable as frozen.
        dtype: dtype of the adapter's tensors (default: the base weight's dtype; e.g. ``torch.float32`` to keep
            adapters of a bf16 model in full precision).
    """
    require(isinstance(config, AdapterConfig) and bool(config.method), "config", type(config).__name__,
            f"must be a registered method's config; methods: {', '.join(METHODS.names())}")
    require(isinstance(name, str) and name.isidentifier(), "name", name, "must be a Python identifier")
    if name in configs(model):
        raise LorakitError(f"adapter {name!r} already exists on this model; delete it first or pick another name")
    built, shared = build_adapters(model, config, dtype)  # build everything first: a failure leaves the model untouched
    for _, _, host, adapter in built:
        host.check_rewrite(name, adapter)
    to_save = resolve(model, config.modules_to_save, name) if config.modules_to_save else []
    for path, module, host, adapter in built:
        if host is not module:
            _replace(model, path, host)
        host.add(name, adapter)
    for path, module in to_save:
        wrapper = module if isinstance(module, SavedModule) else SavedModule(module, path)
        if wrapper is not module:
            _replace(model, path, wrapper)
        wrapper.add(name)
    if shared is not None:
        if SHARED not in model._modules:
            model.add_module(SHARED, nn.ModuleDict())
        model._modules[SHARED][name] = shared
    configs(model)[name] = config
    if activate:
        set_active(model, name)
    if freeze_base:
        _freeze_all_but_adapters(model)
    return model


def _freeze_all_but_adapters(model: nn.Module) -> None:
    model.requires_grad_(False)
    for p in trainable_parameters(model).values():
        p.requires_grad_(True)


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Activate ``names`` (one adapter, or several whose contributions are summed; at most one of them may have its
    own copy of a given module to save)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    _check_names(model, names)
    check_active(model, names)
    for host in hosts(model):
        host.active = tuple(n for n in names if n in host.adapters)
    for wrapper in saved_modules(model):
        wrapper.active = tuple(n for n in names if n in wrapper.modules_to_save)


def active_adapters(model: nn.Module) -> list[str]:
    seen: dict[str, None] = {}
    for host in hosts(model):
        seen.update(dict.fromkeys(host.active))
    return list(seen)


def _switchable(model: nn.Module) -> list[HostLayer | SavedModule]:
    """Host layers and modules to save, in one pass over the model (``route`` / ``mix`` call this every batch)."""
    return [m for m in model.modules() if isinstance(m, (HostLayer, SavedModule))]


class _Switch(contextlib.AbstractContextManager):
    """Applies a change now; used as a context manager, restores the previous state on exit."""

    def __init__(self, model: nn.Module, disabled: bool) -> None:
        self._previous = [(h, h.disabled) for h in _switchable(model)]
        for host, _ in self._previous:
            host.disabled = disabled

    def __exit__(self, *exc: object) -> None:
        for host, state in self._previous:
            host.disabled = state


def disable(model: nn.Module) -> _Switch:
    """Run the base model, with the original modules to save (``with lorakit.disable(model): ...`` restores adapters
    afterwards)."""
    return _Switch(model, True)


def enable(model: nn.Module) -> _Switch:
    """Re-enable adapters (also usable as a context manager)."""
    return _Switch(model, False)


class _Scale(contextlib.AbstractContextManager):
    """Sets adapters' runtime multipliers now; used as a context manager, restores the previous ones on exit."""

    def __init__(self, model: nn.Module, names: Sequence[str], scale: float) -> None:
        layers = [(h, n) for h in hosts(model) for n in names if n in h.adapters]
        merged = sorted({n for h, n in layers if n in h.merged})
        if merged and scale != 1:
            raise LorakitError(f"adapters {merged} are merged into the base weights; unmerge before scaling them")
        self._previous = [(h.adapters[n], h.adapters[n].multiplier) for h, n in layers]
        for adapter, _ in self._previous:
            adapter.multiplier = scale

    def __exit__(self, *exc: object) -> None:
        for adapter, multiplier in self._previous:
            adapter.multiplier = multiplier


def set_scale(model: nn.Module, names: str | Sequence[str], scale: float) -> _Scale:
    """Multiply the contributions of adapters ``names`` by ``scale`` in every forward from now on:
    ``out = base(x) + scale * delta(x)`` (1: as trained; 0: no contribution, and no gradient).

    Every routing strategy honours it (the active sum, ``route``'s rows, ``mix``'s weights); the fused single-adapter
    product runs only at scale 1 (else the unfused path computes the same output). It is a runtime setting: files hold
    the adapter as trained, and merging refuses a scale other than 1. ``with lorakit.set_scale(model, "a", 0.5): ...``
    restores the previous scales afterwards. (An :class:`~lorakit.pool.AdapterPool`'s slots and the
    ``lorakit.compose`` strategies do not read it.)
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    _check_names(model, names)
    require(isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale), "scale", scale,
            "must be a finite number")
    return _Scale(model, names, float(scale))


@contextlib.contextmanager
def route(model: nn.Module, names: Sequence[str | None],
          mixtures: Mapping[str, WeightedRouting] | None = None) -> Iterator[RowRouting]:
    """Within the block, row ``i`` of every batch uses adapter ``names[i]`` (``None``: the base model; a name of
    ``mixtures``: that weighted mixture of experts).

    Works in training too: each adapter receives gradients from its own rows only.
    """
    _check_routable(model, [n for n in names if n is not None and n not in (mixtures or {})])
    with using(model, RowRouting(names, mixtures)) as routing:
        yield routing


@contextlib.contextmanager
def using(model: nn.Module, routing: R) -> Iterator[R]:
    """Within the block, every host layer of ``model`` delegates its forward to the strategy ``routing`` (see
    :mod:`lorakit.routing.strategy`), and every module to save picks its copy by it; the previous strategies come back
    afterwards."""
    layers = _switchable(model)
    previous = [h.routing for h in layers]
    for host in layers:
        host.routing = routing
    try:
        yield routing
    finally:
        for host, old in zip(layers, previous):
            host.routing = old


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights (each at its saved strength: an adapter whose
    :func:`set_scale` is not 1 is refused)."""
    names = tuple(active_adapters(model)) if names is None else ((names,) if isinstance(names, str) else tuple(names))
    _check_names(model, names)
    for host in hosts(model):
        scaled = [n for n in names if n in host.adapters and host.adapters[n].multiplier != 1]
        if scaled:
            raise LorakitError(f"adapters {scaled} run at a scale other than 1 (set_scale); merging folds them at "
                               "their saved strength: set_scale(model, names, 1.0) first")
    for host in hosts(model):
        host.merge(tuple(n for n in names if n in host.adapters))


def unmerge(model: nn.Module) -> None:
    """Restore the base weights of every layer that has merged adapters."""
    for host in hosts(model):
        host.unmerge()


def unload(model: nn.Module, *, merge_active: bool = False) -> nn.Module:
    """Remove every host layer, putting the original modules back (after merging the active adapters if asked).

    Modules to save get their original back, or with ``merge_active`` the active adapter's copy (kept trainable)."""
    pool = model.__dict__.get(POOL)
    if pool is not None and pool.names():
        raise LorakitError(f"the model's AdapterPool holds adapters {pool.names()}; unregister them before unload")
    if merge_active:
        merge(model)
    for host in list(hosts(model)):
        if not merge_active:
            host.unmerge()
        _replace(model, host.path, host.base_layer)
    for wrapper in list(saved_modules(model)):
        _replace(model, wrapper.path, wrapper._active_module() if merge_active else wrapper.original_module)
    drop_entry(model, SHARED, None)
    drop_entry(model, ROUTERS, None)
    configs(model).clear()
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers and modules to save left without adapters get their original module back."""
    _check_names(model, [name])
    for host in list(hosts(model)):
        if name in host.adapters:
            host.remove(name)
            if not host.adapters and host.stack is None:  # an AdapterPool's slots keep their layer
                _replace(model, host.path, host.base_layer)
    for wrapper in list(saved_modules(model)):
        if name in wrapper.modules_to_save:
            wrapper.remove(name)
            if not wrapper.modules_to_save:
                _replace(model, wrapper.path, wrapper.original_module)
    drop_entry(model, SHARED, name)
    del configs(model)[name]


def trainable_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """Declared trainable tensors of every adapter and router (or of adapter / router ``name``), by their name in
    ``model``, with each adapter's copies of its modules to save; frozen adapters (``Adapter.frozen``: experts loaded
    from files) train nothing."""
    if name is not None and name not in routers(model):
        _check_names(model, [name])
    out: dict[str, nn.Parameter] = {}
    for host in hosts(model):
        for adapter_name, adapter in host.adapters.items():
            if (name is None or adapter_name == name) and not adapter.frozen:
                for key, p in adapter.trainable().items():
                    out[f"{host.path}.adapters.{adapter_name}.{key}"] = p
    for adapter_name, shared in shared_states(model).items():
        if name is None or adapter_name == name:
            for key, p in shared.trainable().items():
                out[f"{SHARED}.{adapter_name}.{key}"] = p
    for wrapper in saved_modules(model):
        for adapter_name, module in wrapper.modules_to_save.items():
            if name is None or adapter_name == name:
                for key, p in module.named_parameters():
                    out[f"{wrapper.path}.modules_to_save.{adapter_name}.{key}"] = p
    for router_name, router in routers(model).items():
        if name is None or router_name == name:
            out.update({f"{ROUTERS}.{router_name}.{key}": p for key, p in router.named_parameters()})
    return out


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """The structural role of trained tensors, by their :func:`trainable_parameters` name: ``"up"`` for each
    adapter's up-projection factors (``Adapter.up_projections``); tensors without a role are absent."""
    return {f"{host.path}.adapters.{adapter_name}.{key}": "up"
            for host in hosts(model) for adapter_name, adapter in host.adapters.items()
            for key in adapter.up_projections()}


@dataclass(frozen=True)
class TargetInfo:
    """One row of :func:`inspect_targets`: a layer that would be adapted."""

    path: str
    layer: str
    kind: str
    shape: tuple[int, ...]
    trainable: int


def inspect_targets(model: nn.Module, config: AdapterConfig) -> list[TargetInfo]:
    """Dry run of :func:`adapt`: what would be adapted and how many trainable parameters each layer gets.

    State shared across layers (see :class:`~lorakit.methods.base.SharedState`) is not counted per layer.
    """
    rows = []
    for path, _, host, adapter in build_adapters(model, config)[0]:
        rows.append(TargetInfo(path, type(host.base_layer).__name__, host.geometry.kind,
                               tuple(host.backend.weight().shape),
                               sum(p.numel() for p in adapter.trainable().values())))
    return rows

