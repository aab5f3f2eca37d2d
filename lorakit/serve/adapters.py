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

from ..errors import AdapterFileError, LorakitError
from ..inject import configs


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
    """``path`` resolved (``..`` and symlinks followed) if it lies inside ``allowed_dir``; else a clear error.

    ``allowed_dir=None`` refuses every path: a server loads adapters at run time only from a directory its operator
    named (vLLM likewise needs an explicit opt-in for runtime LoRA loading).
    """
    if allowed_dir is None:
        raise PermissionError("loading adapters at run time is disabled; start the server with --allowed-dir DIR")
    if not isinstance(path, str) or not path or "\x00" in path:
        raise AdapterFileError(f"adapter path {path!r} is invalid: give a folder path")
    root = Path(allowed_dir).expanduser().resolve()
    resolved = (root / Path(path).expanduser()).resolve()  # a relative path is taken relative to the allowed dir
    if not resolved.is_relative_to(root):
        raise AdapterFileError(f"adapter path {path!r} is outside the allowed directory {str(root)!r}")
    return resolved
