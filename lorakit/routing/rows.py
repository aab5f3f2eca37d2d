"""Per-row adapter routing (the segment path).

A :class:`RowRouting` is built once per batch and shared by every host layer. It groups the rows by adapter
so each layer runs one product per adapter segment, then adds all segments back with a single ``index_add``.
Everything is differentiable: gradients reach each adapter from exactly its own rows.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import torch
from torch import Tensor

from ..errors import LorakitError


class RowRouting:
    """Adapter name (or ``None`` for the base model) per row of the batch."""

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = list(names)
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
