"""Mixtures served as model names: ``lorakit serve --mixture moe=out/moe``.

A mixture folder (:func:`lorakit.mixtures.files.save_mixture`) whose router weighs its experts layer by layer from
each layer's own input (a :class:`~lorakit.routing.routers.GateRouter`: MeteoRA, LoRA-Mixer, MoLA-style token
routing) is loaded once: its experts attach to the model (frozen, not active), its router registers under the
mixture's name. A request naming the mixture gets, in every layer, ``base(x) + sum_i w_i(x) delta_i(x)`` on its own
rows, while the other rows of the same batch keep their adapters (the mixture rows of
:class:`~lorakit.routing.rows.RowRouting`); it works with the KV cache since the weights depend only on the current
tokens. Not served: FFN expert blocks (MixLoRA), which change the model for every row, and X-LoRA's two passes,
which cannot continue from a KV cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..errors import LorakitError
from ..inject import routers
from ..mixing import add_router, delete_router
from ..mixtures.files import load_mixture, read_mixture
from ..routing.routers import GateRouter
from ..routing.weighted import WeightedRouting
from .adapters import AdapterSet


def load_served_mixture(model: nn.Module, name: str, folder: str | Path) -> WeightedRouting:
    """Load the mixture in ``folder`` into ``model`` with its router named ``name``; returns its routing."""
    mixture = read_mixture(folder)
    if mixture.blocks is not None:
        raise LorakitError(f"mixture {name!r}: FFN expert blocks (MixLoRA) change the model for every request, so "
                           f"they cannot be served beside other adapters; serve them as the model itself")
    if name in routers(model):
        raise LorakitError(f"mixture name {name!r} is already used by a router of this model")
    load_mixture(model, folder)
    router = routers(model)[mixture.router]
    delete_router(model, mixture.router)
    if not isinstance(router, GateRouter):
        raise LorakitError(f"mixture {name!r}: its router is a {type(router).__name__}; served mixtures need a "
                           f"per-layer gate router (X-LoRA's two passes cannot continue from a KV cache)")
    return WeightedRouting(mixture.experts, add_router(model, name, router))


class WithMixtures:
    """An adapter set plus mixtures: ``names()`` lists both, mixtures need no slot (their experts stay attached)."""

    def __init__(self, inner: AdapterSet, mixtures: dict[str, WeightedRouting]) -> None:
        clash = sorted(set(inner.names()) & set(mixtures))
        if clash:
            raise LorakitError(f"names used by both an adapter and a mixture: {clash}")
        self.inner, self.mixtures = inner, dict(mixtures)

    def names(self) -> list[str]:
        return [*self.inner.names(), *self.mixtures]

    @property
    def slot_table(self) -> Any:
        """The inner set's slot table (an adapter pool's), or ``None``."""
        return getattr(self.inner, "slot_table", None)

    def acquire(self, names: Sequence[str]) -> None:
        self.inner.acquire([n for n in names if n not in self.mixtures])

    def release(self, names: Sequence[str]) -> None:
        self.inner.release([n for n in names if n not in self.mixtures])

    def register(self, name: str, path: Any) -> Any:
        if name in self.mixtures:
            raise LorakitError(f"{name!r} is a served mixture; pick another adapter name")
        return self.inner.register(name, path)  # type: ignore[attr-defined]

    def unregister(self, name: str) -> Any:
        if name in self.mixtures:
            raise LorakitError(f"{name!r} is a mixture loaded at start; it cannot be unloaded at run time")
        return self.inner.unregister(name)  # type: ignore[attr-defined]
