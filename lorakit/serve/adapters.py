"""Which adapters the engine can route to, and where a server may load adapter files from.

The engine talks to an *adapter set* with the :class:`~lorakit.pool.AdapterPool` API (``names``,
``acquire``, ``release``; a server also needs ``register`` / ``unregister``). The pool is the choice for many
adapters (S-LoRA, METHODS.md entry 65); :class:`AttachedAdapters` serves the adapters a caller attached to the model
itself (``lorakit.adapt`` / ``lorakit.load_adapter``), all resident, nothing to load or evict.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

from torch import nn

from ..errors import LorakitError
from ..inject import configs
from ..io.files import resolve_inside


class UnknownAdapterError(LorakitError, KeyError):
    """A request named an adapter that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class AdapterSet(Protocol):
    def names(self) -> list[str]: ...
    def acquire(self, names: Sequence[str]) -> None: ...
    def release(self, names: Sequence[str]) -> None: ...


class AttachedAdapters:
    """The adapters already attached to ``model``; acquiring checks the names, releasing does nothing."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def names(self) -> list[str]:
        return list(configs(self.model))

    def acquire(self, names: Sequence[str]) -> None:
        known = configs(self.model)
        for name in names:
            if name not in known:
                raise UnknownAdapterError(f"unknown adapter {name!r}; registered: {sorted(known) or 'none'}")

    def release(self, names: Sequence[str]) -> None:
        pass


def safe_adapter_path(path: str, allowed_dir: str | Path | None) -> Path:
    """``path`` resolved inside ``allowed_dir`` (:func:`lorakit.io.files.resolve_inside`); else a clear error.

    ``allowed_dir=None`` refuses every path: a server loads adapters at run time only from a directory its operator
    named (vLLM likewise needs an explicit opt-in for runtime LoRA loading).
    """
    if allowed_dir is None:
        raise PermissionError("loading adapters at run time is disabled; start the server with --allowed-dir DIR")
    return resolve_inside(path, allowed_dir)
