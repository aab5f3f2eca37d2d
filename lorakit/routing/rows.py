"""Per-row adapter routing: one adapter name (or none) per row of the batch.

A :class:`RowRouting` is built once per batch and shared by every host layer. Per layer it picks the execution path:
rows of an adapter pool's slots go through the layer's slot tensors (the stacked path, :mod:`.stacked`); rows of
attached adapters share one grouped product when each is exactly ``B_eff A_eff`` (multi-job training), else run the
segment path, one adapter call per group of rows, all added back with a single ``index_add``. Everything is
differentiable: gradients reach each adapter from exactly its own rows.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import LorakitError
from .stacked import apply_grouped, stackable
from .strategy import Host, Routing, contribution, scaled_factors, sum_of
from .weighted import WeightedRouting


class RowRouting(Routing):
    """Adapter name (or ``None`` for the base model) per row of the batch; a name of ``mixtures`` routes its rows
    through that mixture (a weighted routing over its experts, e.g. a served MeteoRA / LoRA-Mixer)."""

    def __init__(self, names: Sequence[str | None], mixtures: Mapping[str, WeightedRouting] | None = None) -> None:
        self.names = list(names)
        self.mixtures = dict(mixtures or {})
        order: dict[str, list[int]] = {}
        for row, name in enumerate(self.names):
            if name is not None:
                order.setdefault(name, []).append(row)
        self._rows = order
        self._by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
        self._cache: dict[Hashable, Any] = {}

    @property
    def adapters(self) -> list[str]:
        return list(self._rows)

    @property
    def only(self) -> str | None:
        """The adapter of every row when all rows share one, else ``None``."""
        only = self.names[0] if self.names else None
        return only if only is not None and len(self._rows[only]) == len(self.names) else None

    def groups(self, device: torch.device) -> list[tuple[str, Tensor]]:
        """``(adapter, row indices)`` per adapter present, index tensors cached per device."""
        if device not in self._by_device:
            self._by_device[device] = [
                (name, torch.tensor(rows, dtype=torch.long, device=device)) for name, rows in self._rows.items()
            ]
        return self._by_device[device]

    def cached(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """``make()`` once per batch and ``key`` (e.g. the stacked path's per-row slot ids), shared by all layers."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def check_rows(self, n_rows: int, layer: str) -> None:
        if n_rows != len(self.names):
            raise LorakitError(
                f"route() was given {len(self.names)} adapter names but layer {layer!r} received a batch of "
                f"{n_rows} rows; give one name (or None) per row"
            )

    def check(self, host: Host) -> None:
        if host.merged:
            raise LorakitError(f"layer {host.path!r} has merged adapters {host.merged}; unmerge before routing rows")

    def forward(self, host: Host, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Rows of no adapter (or of one that does not target this layer) keep the base output."""
        self.check_rows(x.shape[0], host.path)
        only = self.only
        if only in self.mixtures:
            return self.mixtures[only].forward(host, x, *args, **kwargs)
        if only is not None and (host.stack is None or only not in host.stack.table.slots):
            return sum_of(host, (only,) if only in host.adapters else (), x, *args, **kwargs)  # fused where it can
        base_out = host.base_layer(x, *args, **kwargs)
        out = base_out if host.stack is None else host.stack.apply(x, base_out, self)
        for name, idx in self.groups(x.device):
            if name in self.mixtures:  # its rows: the mixture's output (no adapter or slot holds the name)
                mixed = self.mixtures[name].apply(host, x.index_select(0, idx), base_out.index_select(0, idx))
                out = out.index_copy(0, idx, mixed.to(out.dtype))
        groups = [(name, idx) for name, idx in self.groups(x.device) if name in host.adapters]
        if len(groups) > 1 and all(stackable(host.adapters[n], host.geometry.kind) for n, _ in groups):
            return apply_grouped(x, out, self, {n: scaled_factors(host, n) for n, _ in groups})
        pieces, rows = [], []
        for name, idx in groups:
            pieces.append(contribution(host, name, x.index_select(0, idx), base_out.index_select(0, idx)))
            rows.append(idx)
        return out.index_add(0, torch.cat(rows), torch.cat(pieces)) if pieces else out
