"""Routing strategies: how a host layer combines its base output with its adapters' contributions.

A host layer owns a base layer and named adapters; *which* adapters apply to *which* rows or tokens, and with what
weight, is a :class:`Routing` object that :meth:`HostLayer.forward <lorakit.hosts.host.HostLayer.forward>` delegates
to. One strategy object serves every layer of a model for one batch (``lorakit.route`` / ``lorakit.mix`` install it;
outside them each layer uses :data:`ACTIVE`). Every strategy computes, for layer input ``x`` and frozen output
``base(x)``,

    out = base(x) + sum_i  w_i * delta_i(x)

where ``delta_i(x) = adapter_i(x, base(x))`` is adapter ``i``'s contribution and ``w_i`` is

* :class:`ActiveSum` -- 1 for each active adapter (``set_active``), the default; one active LoRA-family adapter on a
  dense base is one fused product (:mod:`lorakit.kernels.lora_linear`);
* :class:`~lorakit.routing.rows.RowRouting` -- 1 for the adapter named for the row, 0 for the others (mixed batches,
  multi-job training, serving): stacked slots, a grouped product or one call per segment of rows, chosen per batch;
* :class:`~lorakit.routing.weighted.WeightedRouting` -- a weight per token (or row) and adapter, given or computed by
  a router module from the layer's input (mixtures of LoRA experts); only the tokens with a non-zero weight reach an
  adapter.

Strategies live below the host layers (:mod:`lorakit.hosts` imports this package, never the reverse): they see a host
through the small :class:`Host` protocol.
"""
from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn


class Host(Protocol):
    """What a routing strategy reads from a host layer."""

    path: str
    base_layer: nn.Module
    adapters: nn.ModuleDict
    active: tuple[str, ...]
    merged: list[str]
    backend: Any  # the base backend (dense or quantised), passed to the adapters
    geometry: Any  # the layer's Geometry: ``kind`` is "linear", "conv" or "embedding"
    stack: Any  # the adapter pool's slot tensors for this layer, or None


class Routing:
    """Base of the strategies: ``forward(host, x, *args, **kwargs)`` returns the layer's output."""

    def forward(self, host: Host, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def check(self, host: Host) -> None:
        """Refuse what the strategy cannot do on ``host`` (called before the forward)."""


def contribution(host: Host, name: str, x: Tensor, base_out: Tensor) -> Tensor:
    """``m * delta(x)``: adapter ``name``'s contribution times its runtime multiplier ``m`` (``Adapter.multiplier``,
    set by ``lorakit.set_scale``). Every strategy computes contributions through here, or through
    :func:`scaled_factors` / the weights (:mod:`.weighted`), so every method honours the multiplier."""
    adapter = host.adapters[name]
    delta = adapter(x, base_out, host.backend)
    return delta if adapter.multiplier == 1 else delta * adapter.multiplier


def scaled_factors(host: Host, name: str) -> tuple[Tensor, Tensor]:
    """``(m B_eff, A_eff)``: adapter ``name``'s ``factors()`` with its runtime multiplier folded into ``B_eff``."""
    adapter = host.adapters[name]
    b, a = adapter.factors()
    return (b if adapter.multiplier == 1 else b * adapter.multiplier), a


def sum_of(host: Host, names: tuple[str, ...], x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """``base(x)`` plus the contributions of adapters ``names`` (fused when there is one at multiplier 1 and it can
    be)."""
    if not names:
        return host.base_layer(x, *args, **kwargs)
    if len(names) == 1 and host.adapters[names[0]].multiplier == 1:
        fused = host.adapters[names[0]].fused_forward(x, host.backend)
        if fused is not None:
            return fused
    base_out = host.base_layer(x, *args, **kwargs)
    out = base_out
    for name in names:
        out = out + contribution(host, name, x, base_out)
    return out


class ActiveSum(Routing):
    """The active adapters of each layer (``set_active``), summed; merged ones are already in the base weight."""

    def forward(self, host: Host, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return sum_of(host, tuple(a for a in host.active if a not in host.merged), x, *args, **kwargs)


ACTIVE = ActiveSum()
