"""Which adapter applies to which rows: per-row routing (segment path), the stacked path and the adapter pool.

``AdapterPool`` is imported on first use: the host layers import :mod:`.rows` and :mod:`.stacked` from here, and the
pool imports the host layers.
"""
from __future__ import annotations

from typing import Any

__all__ = ["AdapterPool"]


def __getattr__(name: str) -> Any:
    if name == "AdapterPool":
        from .pool import AdapterPool

        return AdapterPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
