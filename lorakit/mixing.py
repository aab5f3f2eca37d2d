"""Weighted routing on a model: ``lorakit.mix`` and the routers it can use.

    router = lorakit.add_router(model, "moe", lorakit.gate_router(model, ["a", "b", "c"], top_k=2))
    with lorakit.mix(model, ["a", "b", "c"], router):      # each layer: base + sum_i w_i(x) delta_i(x)
        loss = model(**batch).loss                          # gradients reach the router and the adapters
    with lorakit.mix(model, ["a", "b"], torch.tensor([0.7, 0.3])):   # fixed weights (a linear merge, unmerged)
        ...

The strategy is :class:`~lorakit.routing.weighted.WeightedRouting`. A router registered with :func:`add_router`
lives on the model under ``lorakit_routers.<name>``: ``trainable_parameters`` includes it (so do optimizers built from
it and ``lorakit.adapt(..., freeze_base=True)``), and :func:`lorakit.io.routers.save_router` writes it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

from torch import Tensor, nn

from .errors import LorakitError, require
from .inject import ROUTERS, _check_names, drop_entry, hosts, routers, using
from .routing.routers import GateRouter
from .routing.weighted import Router, WeightedRouting


def add_router(model: nn.Module, name: str, router: nn.Module) -> nn.Module:
    """Register ``router`` on ``model`` as ``lorakit_routers.<name>`` (trainable, saved with it); returns it."""
    require(isinstance(name, str) and name.isidentifier(), "name", name, "must be a Python identifier")
    require(isinstance(router, nn.Module), "router", type(router).__name__, "must be an nn.Module")
    require(not isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)), "model", type(model).__name__,
            "must not be a container whose forward runs all its children (the router would become one of them); "
            "wrap it in a Module")
    if name in routers(model):
        raise LorakitError(f"router {name!r} already exists on this model; delete it first or pick another name")
    if ROUTERS not in model._modules:
        model.add_module(ROUTERS, nn.ModuleDict())
    model._modules[ROUTERS][name] = router
    return router


def delete_router(model: nn.Module, name: str) -> None:
    """Remove router ``name``."""
    if name not in routers(model):
        raise LorakitError(f"unknown router {name!r}; this model has: {sorted(routers(model)) or 'none'}")
    drop_entry(model, ROUTERS, name)


def gate_router(model: nn.Module, names: Sequence[str], top_k: int | None = None, temperature: float = 1.0,
                **options: Any) -> GateRouter:
    """A :class:`GateRouter` over adapters ``names`` with a gate on every linear host layer holding one of them, on
    the device and dtype of that layer's weight. A layer holding only the first ``N_l`` of ``names`` routes over
    those (MoLA's per-layer expert counts). ``options``: ``noisy``, ``hard``, ``balance``, ``z_loss`` (see
    :class:`GateRouter`)."""
    layers = [h for h in hosts(model) if h.geometry.kind == "linear" and any(n in h.adapters for n in names)]
    if not layers:
        raise LorakitError(f"no linear layer of this model holds any of the adapters {list(names)}")
    counts = {}
    for host in layers:
        held = [n in host.adapters for n in names]
        counts[host.path] = sum(held)
        if not all(held[: counts[host.path]]):
            raise LorakitError(f"layer {host.path!r} holds adapters {[n for n in names if n in host.adapters]}; a "
                               f"router over {list(names)} needs each layer to hold a prefix of them")
    router = GateRouter(len(names), {h.path: h.geometry.d_in for h in layers}, top_k, temperature,
                        experts=counts, **options)
    w = layers[0].backend.weight()
    return router.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)


@contextlib.contextmanager
def mix(model: nn.Module, names: Sequence[str], weights: Tensor | Router,
        dispatch: str = "sparse") -> Iterator[WeightedRouting]:
    """Within the block, every layer computes ``base(x) + sum_i w_i delta_i(x)`` over adapters ``names``.

    ``weights``: ``(n,)``, ``(rows, n)`` or ``(rows, tokens, n)``, or a router ``router(layer_path, x)`` such as
    :func:`gate_router`'s. ``dispatch="sparse"`` runs each adapter only on the tokens with a non-zero weight for it;
    ``"dense"`` runs all adapters on all tokens (the reference).
    """
    _check_names(model, list(names))  # attached adapters: an AdapterPool's slot-only adapters do not mix (yet)
    with using(model, WeightedRouting(names, weights, dispatch)) as routing:
        yield routing
