"""The host layer: one base layer + any number of named adapters + routing.

``HostLayer`` replaces a supported module in the user's model. It composes three independent things: a base
backend (how the frozen weight is stored and applied), adapters (instances of registered methods), and routing
(the active adapters summed, or an adapter per row of the batch).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LorakitError
from ..routing.rows import RowRouting
from .backend import DenseBackend
from .geometry import Geometry, geometry_of


class HostLayer(nn.Module):
    """Wraps ``base_layer``; its forward is ``base(x) + sum of the routed adapters' contributions``."""

    def __init__(self, base_layer: nn.Module, path: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        self.geometry: Geometry = geometry_of(base_layer)
        self.backend = DenseBackend(base_layer)
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.disabled = False
        self.routing: RowRouting | None = None

    def add(self, name: str, adapter: nn.Module) -> None:
        if name in self.adapters:
            raise LorakitError(f"layer {self.path!r} already has an adapter named {name!r}")
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise LorakitError(f"adapter {name!r} is merged into {self.path!r}; unmerge it before deleting")
        del self.adapters[name]
        self.active = tuple(a for a in self.active if a != name)

    # -- merging ---------------------------------------------------------------------------------------
    def merge(self, names: tuple[str, ...]) -> None:
        for name in names:
            if name in self.merged:
                continue
            adapter = self.adapters[name]
            if not adapter.capabilities.mergeable:
                raise LorakitError(f"adapter {name!r} ({type(adapter).__name__}) cannot be merged")
            adapter.merge_into(self.backend)
            self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            self.adapters[self.merged.pop()].unmerge_from(self.backend)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disabled:
            if self.merged:
                raise LorakitError(f"layer {self.path!r} has merged adapters {self.merged}; unmerge before disabling")
            return self.base_layer(x, *args, **kwargs)
        if self.routing is not None:
            return self._forward_rows(x, self.routing)
        live = tuple(a for a in self.active if a not in self.merged)
        if not live:
            return self.base_layer(x, *args, **kwargs)
        if len(live) == 1:
            fused = self.adapters[live[0]].fused_forward(x, self.backend)
            if fused is not None:
                return fused
        base_out = self.base_layer(x, *args, **kwargs)
        out = base_out
        for name in live:
            out = out + self.adapters[name](x, base_out, self.backend)
        return out

    def _forward_rows(self, x: Tensor, routing: RowRouting) -> Tensor:
        """Segment path: one adapter call per group of rows, all added back with one ``index_add``."""
        routing.check_rows(x.shape[0], self.path)
        if self.merged:
            raise LorakitError(f"layer {self.path!r} has merged adapters {self.merged}; unmerge before routing rows")
        base_out = self.base_layer(x)
        pieces, rows = [], []
        for name, idx in routing.groups(x.device):
            if name not in self.adapters:  # this adapter does not target this layer: base output
                continue
            xs = x.index_select(0, idx)
            pieces.append(self.adapters[name](xs, base_out.index_select(0, idx), self.backend))
            rows.append(idx)
        if not pieces:
            return base_out
        return base_out.index_add(0, torch.cat(rows), torch.cat(pieces))

    def extra_repr(self) -> str:
        return f"path={self.path!r}, adapters={list(self.adapters)}, active={list(self.active)}"
