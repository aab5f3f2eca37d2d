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
from .geometry import Geometry, geometry_of, per_unit


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
        self._merge_scales: dict[str, Tensor | None] = {}
        self.disabled = False
        self.routing: RowRouting | None = None

    def add(self, name: str, adapter: nn.Module) -> None:
        """Attach ``adapter`` (which may rewrite the base weight, see ``Adapter.attach``) under ``name``."""
        if name in self.adapters:
            raise LorakitError(f"layer {self.path!r} already has an adapter named {name!r}")
        adapter.attach(self.backend)
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise LorakitError(f"adapter {name!r} is merged into {self.path!r}; unmerge it before deleting")
        del self.adapters[name]
        self.active = tuple(a for a in self.active if a != name)

    # -- merging ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: tuple[str, ...]) -> None:
        """Fold adapters into the base weight, each relative to the unmerged base as in the forward pass.

        With per-unit factors ``c_i`` and additive parts ``D_i`` (see ``Adapter.merge_scale``), the merged weight
        is ``(1 + sum(c_i - 1)) W0 + sum(D_i)``; the factors are kept so :meth:`unmerge` restores ``W0`` exactly.
        """
        todo = list(dict.fromkeys(self.merged + list(names)))
        if todo == self.merged:
            return
        for name in todo:
            if not self.adapters[name].capabilities.mergeable:
                raise LorakitError(f"adapter {name!r} ({type(self.adapters[name]).__name__}) cannot be merged")
        self.unmerge()
        w0 = self.backend.weight().float()
        scales = {n: self.adapters[n].merge_scale(self.backend) for n in todo}
        total, delta = self._merge_terms(scales, w0)
        self.backend.set_weight(total * w0 + delta)
        self._shift_bias(todo, +1.0)
        self.merged, self._merge_scales = todo, scales

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        total, delta = self._merge_terms(self._merge_scales, self.backend.weight())
        self.backend.set_weight((self.backend.weight().float() - delta) / total)
        self._shift_bias(self.merged, -1.0)
        self.merged, self._merge_scales = [], {}

    def _merge_terms(self, scales: dict[str, Tensor | None], like: Tensor) -> tuple[Tensor, Tensor]:
        total = torch.ones((), dtype=torch.float32, device=like.device)
        delta = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        for name, scale in scales.items():
            if scale is not None:
                total = total + (per_unit(scale, like) - 1)
            delta += self.adapters[name].merge_delta(scale).float()
        return total, delta

    def _shift_bias(self, names: list[str], sign: float) -> None:
        for name in names:
            shift = self.adapters[name].bias_delta()
            if shift is None:
                continue
            if self.backend.bias is None:
                raise LorakitError(f"adapter {name!r} has a bias but {self.path!r} has none to merge it into")
            self.backend.set_bias(self.backend.bias.float() + sign * shift.float())

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
