"""Adapter pool: many adapters in host memory, a bounded number resident on the model (S-LoRA, METHODS.md entry 65).

S-LoRA keeps every adapter in main memory and fetches the ones running requests need to the GPU, evicting others.
Here an adapter is *registered* (its folder read once into host memory, validated) and *resident* when it is
attached to the model as a lorakit adapter, so :func:`lorakit.route` can run a batch mixing resident adapters.
Residency is bounded by ``capacity``; :meth:`AdapterPool.acquire` makes adapters resident, evicting the least
recently used ones that are neither pinned nor in use. Factorable adapters on linear layers are also packed into
each layer's :class:`~lorakit.routing.stacked.SlotStack` (the stacked decode path); the slots live on the model's
device, the registered tensors in host memory.

Assumed where the paper is vague: "in use" is a count (``acquire`` / ``release`` pairs, e.g. one per running
request), pinning makes an adapter resident and keeps it so, and registering validates the folder against the
model by attaching it once (it stays resident when a slot is free, costing nothing later). The pool is guarded by a
lock so a server may call it from several threads; a forward pass must not run while ``acquire`` changes residency.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import AdapterFileError, LorakitError
from ..inject import configs, delete_adapter, hosts
from ..io.adapter_files import CONFIG_FILE, attach_adapter, read_adapter
from ..io.files import read_json
from .stacked import SlotStack, SlotTable

_POOL = "_lorakit_pool"


@dataclass
class _Entry:
    config: AdapterConfig
    tensors: dict[str, Tensor]  # lorakit-keyed, host memory
    source: Path
    base: str | None
    targets: list[str] = field(default_factory=list)
    pinned: bool = False
    users: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class AdapterPool:
    """Registered adapters over one base ``model``, at most ``capacity`` of them resident at a time.

    Args:
        model: the base model (adapters are attached to it in place).
        capacity: how many adapters may be resident at once (>= 1).
        allowed_dir: when given, :meth:`register` refuses folders outside it (after resolving symlinks and ``..``).
    """

    def __init__(self, model: nn.Module, capacity: int, allowed_dir: str | Path | None = None) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise LorakitError(f"capacity={capacity!r} is invalid: must be a positive integer")
        self.model = model
        self.capacity = capacity
        self.allowed_dir = None if allowed_dir is None else Path(allowed_dir).resolve()
        self._entries: dict[str, _Entry] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._table = SlotTable(capacity)
        self._lock = threading.RLock()
        if model.__dict__.setdefault(_POOL, self) is not self:
            raise LorakitError("this model already has an AdapterPool; use one pool per model")

    # -- registration ----------------------------------------------------------------------------------
    def register(self, name: str, path: str | Path) -> None:
        """Read the adapter folder ``path`` (PEFT or lorakit files) into host memory as ``name``.

        Raises:
            LorakitError: ``name`` is not an identifier or is taken.
            AdapterFileError: the folder is outside ``allowed_dir``, missing, corrupt, or does not fit the model.
        """
        with self._lock:
            if not isinstance(name, str) or not name.isidentifier():
                raise LorakitError(f"adapter name {name!r} is invalid: must be a Python identifier")
            if name in self._entries:
                raise LorakitError(f"adapter {name!r} is already registered; unregister it first or pick another name")
            if name in configs(self.model):
                raise LorakitError(f"the model already has an adapter {name!r} outside the pool; pick another name")
            source = self._checked_path(path)
            config, tensors = read_adapter(source)
            entry = _Entry(config, tensors, source, self._parent_base(source))
            self._attach_to_model(name, entry)  # validates the tensors against the model
            entry.targets = [h.path for h in hosts(self.model) if name in h.adapters]
            self._entries[name] = entry
            if len(self._resident) < self.capacity:
                self._place(name)
            else:
                delete_adapter(self.model, name)

    def unregister(self, name: str) -> None:
        """Forget ``name`` (detaching it if resident); refused while it is pinned or in use."""
        with self._lock:
            entry = self._entry(name)
            if entry.pinned or entry.users:
                state = "pinned" if entry.pinned else f"in use ({entry.users})"
                raise LorakitError(f"adapter {name!r} is {state}; unpin / release it before unregistering")
            if name in self._resident:
                self._detach(name)
            del self._entries[name]

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def resident(self) -> list[str]:
        """Resident adapters, least recently used first."""
        with self._lock:
            return list(self._resident)

    def info(self, name: str) -> dict[str, Any]:
        """``method``, ``rank`` (``None`` for methods without one), ``targets`` (module paths), ``base`` (the
        parent base model named by the file, or ``None``), ``bytes`` (host memory), ``path``, and the state."""
        with self._lock:
            e = self._entry(name)
            return {"name": name, "method": e.config.method, "rank": getattr(e.config, "r", None),
                    "targets": list(e.targets), "base": e.base, "bytes": e.nbytes, "path": str(e.source),
                    "resident": name in self._resident, "pinned": e.pinned, "in_use": e.users}

    # -- residency -------------------------------------------------------------------------------------
    def acquire(self, names: Iterable[str]) -> None:
        """Make every adapter in ``names`` resident and mark it in use (pair each call with :meth:`release`).

        Evicts least recently used resident adapters that are not pinned, not in use and not asked for; raises,
        changing nothing, when ``capacity`` cannot hold them.
        """
        with self._lock:
            wanted = list(dict.fromkeys(names))
            for name in wanted:
                self._entry(name)
            self._make_room(wanted)
            for name in wanted:
                if name not in self._resident:
                    self._attach_to_model(name, self._entries[name])
                    self._place(name)
                self._resident.move_to_end(name)
                self._entries[name].users += 1

    def release(self, names: Iterable[str]) -> None:
        """Undo one :meth:`acquire` of each adapter in ``names``."""
        with self._lock:
            wanted = list(dict.fromkeys(names))
            for name in wanted:
                if self._entry(name).users == 0:
                    raise LorakitError(f"adapter {name!r} is not in use; release() must follow acquire()")
            for name in wanted:
                self._entries[name].users -= 1

    def pin(self, name: str) -> None:
        """Make ``name`` resident and never evict it until :meth:`unpin`."""
        with self._lock:
            self._entry(name)
            self._make_room([name])
            if name not in self._resident:
                self._attach_to_model(name, self._entries[name])
                self._place(name)
            self._resident.move_to_end(name)
            self._entries[name].pinned = True

    def unpin(self, name: str) -> None:
        with self._lock:
            self._entry(name).pinned = False

    # -- internals -------------------------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise LorakitError(f"unknown adapter {name!r}; registered: {sorted(self._entries) or 'none'}")
        return self._entries[name]

    def _checked_path(self, path: str | Path) -> Path:
        if not isinstance(path, (str, Path)) or not str(path):
            raise AdapterFileError(f"adapter path {path!r} is invalid: give a folder path")
        resolved = Path(path).expanduser().resolve()
        if self.allowed_dir is not None and not resolved.is_relative_to(self.allowed_dir):
            raise AdapterFileError(f"adapter path {str(path)!r} is outside the allowed directory {self.allowed_dir}")
        return resolved

    @staticmethod
    def _parent_base(source: Path) -> str | None:
        if not (source / CONFIG_FILE).is_file():
            return None
        base = read_json(source / CONFIG_FILE).get("base_model_name_or_path")
        return base if isinstance(base, str) and base else None

    def _make_room(self, wanted: list[str]) -> None:
        missing = [n for n in wanted if n not in self._resident]
        need = len(self._resident) + len(missing) - self.capacity
        if need <= 0:
            return
        evictable = [n for n in self._resident
                     if n not in wanted and not self._entries[n].pinned and not self._entries[n].users]
        if need > len(evictable):
            busy = [n for n in self._resident if n not in evictable and n not in wanted]
            raise LorakitError(
                f"capacity {self.capacity} cannot hold {len(missing)} more adapters {missing}: resident adapters "
                f"{busy} are pinned or in use; release or unpin some, or raise the pool's capacity"
            )
        for name in evictable[:need]:
            self._detach(name)

    def _attach_to_model(self, name: str, entry: _Entry) -> None:
        """Attach ``name`` to the model, not activated; the global RNG is left as it was (init draws are
        overwritten by the file's tensors)."""
        device = next(self.model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            attach_adapter(self.model, entry.config, entry.tensors, name, entry.source, activate=False)

    def _place(self, name: str) -> None:
        """Record attached ``name`` as resident and pack its factors into the layers' slots."""
        self._table.assign(name)
        self._resident[name] = None
        for host in hosts(self.model):
            adapter = host.adapters[name] if name in host.adapters else None
            if adapter is None or not _stackable(adapter, host.geometry.kind):
                continue
            b_eff, a_eff = adapter.factors()
            if host.stack is None or host.stack.table is not self._table:
                host.stack = SlotStack(self._table, a_eff.shape[1], b_eff.shape[0], a_eff.detach())
            host.stack.put(name, b_eff.detach(), a_eff.detach())

    def _detach(self, name: str) -> None:
        for host in hosts(self.model):
            if host.stack is not None and host.stack.table is self._table:
                host.stack.drop(name)
        self._table.free(name)
        del self._resident[name]
        delete_adapter(self.model, name)


def _stackable(adapter: nn.Module, kind: str) -> bool:
    """Factorable on a linear layer with nothing beyond ``B_eff A_eff`` (no bias); dropout is off at inference."""
    return kind == "linear" and adapter.capabilities.factorable and adapter.bias_delta() is None
