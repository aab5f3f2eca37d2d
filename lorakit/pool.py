"""Adapter pool: many adapters in host memory, a bounded number resident on the model (S-LoRA, METHODS.md entry 65).

S-LoRA keeps every adapter in main memory and fetches the ones running requests need to the GPU, evicting others.
Here an adapter is *registered* (its folder read once, validated against the model, kept in host memory) and
*resident* when :func:`lorakit.route` can run rows on it. Residency is bounded by ``capacity``;
:meth:`AdapterPool.acquire` makes adapters resident, evicting the least recently used ones that are neither pinned
nor in use.

Two kinds of residency. A *factorable* adapter (``B_eff A_eff`` on linear layers, no bias: LoRA and most of its
family) is kept in host memory as its per-layer factors, computed once at registration, and made resident by copying
them into its slot of each layer's :class:`~lorakit.routing.stacked.SlotStack` (on the model's device): no module is
built, so a swap costs a copy of the factors. Any other adapter (DoRA, a bias, a convolution) is kept as its file's
tensors and made resident by attaching it to the model as a lorakit adapter (the segment path).

Assumed where the paper is vague: "in use" is a count (``acquire`` / ``release`` pairs, e.g. one per running
request), pinning makes an adapter resident and keeps it so, and registering validates the folder against the
model by attaching it once (a factorable adapter is detached again; it takes a free slot when there is one). Pool
adapters are for inference: frozen, not trainable. The pool is guarded by a lock so a server may call it from
several threads; a forward pass must not run while ``acquire`` changes residency.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .config import AdapterConfig
from .errors import AdapterFileError, LorakitError
from .hosts.host import adapters_named
from .inject import POOL, build_adapters, configs, delete_adapter
from .io.adapter_files import CONFIG_FILE, attach_adapter, read_adapter
from .io.files import read_json, resolve_inside
from .routing.stacked import SlotStack, SlotTable, stackable


@dataclass
class _Entry:
    config: AdapterConfig
    tensors: dict[str, Tensor]  # lorakit-keyed, host memory (empty once ``factors`` are set)
    source: Path
    base: str | None
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # path -> (B_eff, A_eff), host memory
    targets: list[str] = field(default_factory=list)
    pinned: bool = False
    users: int = 0

    @property
    def nbytes(self) -> int:
        held = [*self.tensors.values(), *(t for pair in self.factors.values() for t in pair)]
        return sum(t.numel() * t.element_size() for t in held)


class AdapterPool:
    """Registered adapters over one base ``model``, at most ``capacity`` of them resident at a time.

    Args:
        model: the base model (adapters are attached to it in place).
        capacity: how many adapters may be resident at once (>= 1).
        allowed_dir: when given, :meth:`register` refuses folders outside it (after resolving symlinks and ``..``;
            a relative path is taken relative to it).
        max_registered: most adapters registered at once (their tensors stay in host memory); ``None``: no bound.
    """

    def __init__(self, model: nn.Module, capacity: int, allowed_dir: str | Path | None = None,
                 max_registered: int | None = None) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise LorakitError(f"capacity={capacity!r} is invalid: must be a positive integer")
        if max_registered is not None and (not isinstance(max_registered, int) or max_registered < 1):
            raise LorakitError(f"max_registered={max_registered!r} is invalid: must be None or a positive integer")
        self.max_registered = max_registered
        self.model = model
        self.capacity = capacity
        self.allowed_dir = None if allowed_dir is None else Path(allowed_dir).resolve()
        self._entries: dict[str, _Entry] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._table = SlotTable(capacity)
        self._lock = threading.RLock()
        if model.__dict__.setdefault(POOL, self) is not self:
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
            if self.max_registered is not None and len(self._entries) >= self.max_registered:
                raise LorakitError(f"the pool already holds its maximum of {self.max_registered} registered adapters "
                                   f"(max_registered / --max-registered); unregister one first")
            source = resolve_inside(path, self.allowed_dir)
            config, tensors = read_adapter(source)
            with self._rng_kept():  # building draws random inits, overwritten by the file's tensors
                residual, init = _compensations(self.model, config, source), getattr(config, "init", None)
            if residual:  # attach the trained factors without the base rewrite; the residual joins the factors
                config = config.replace(init=type(config).__dataclass_fields__["init"].default, init_options={})
            entry = _Entry(config, tensors, source, self._parent_base(source))
            self._attach_to_model(name, entry)  # validates the tensors against the model
            layers = [h for h, _ in adapters_named(self.model, name)]
            entry.targets = [h.path for h in layers]
            if residual and not all(stackable(h.adapters[name], h.geometry.kind) for h in layers):
                delete_adapter(self.model, name)
                raise AdapterFileError(
                    f"{source}: its initialiser ({init}) rewrites the base weight, which an "
                    "AdapterPool shares; it is served as its exact plain-LoRA equivalent on the stock base only when "
                    "it is exactly low rank on linear layers. Export it with lorakit.export_lora and register that")
            if all(stackable(h.adapters[name], h.geometry.kind) for h in layers):
                for host in layers:
                    b_eff, a_eff = host.adapters[name].factors()
                    if host.path in residual:  # W + B A - U D: the same update on the stock base, rank r + r0
                        up, down = residual[host.path]
                        b_eff = torch.cat([b_eff, -up.to(b_eff.dtype)], dim=1)
                        a_eff = torch.cat([a_eff, down.to(a_eff.dtype)], dim=0)
                    if host.stack is None or host.stack.table is not self._table:
                        host.stack = SlotStack(self._table, host.geometry.d_in, host.geometry.d_out, a_eff)
                    entry.factors[host.path] = (_to_host(b_eff), _to_host(a_eff))
                entry.tensors = {}
                delete_adapter(self.model, name)  # the layers stay: their slot stacks keep them
            self._entries[name] = entry
            if len(self._resident) < self.capacity:
                self._place(name)
            elif not entry.factors:
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

    @property
    def slot_table(self) -> SlotTable:
        """The slot table shared by every layer's slot stack (which adapter sits in which slot)."""
        return self._table

    def in_slots(self) -> set[str]:
        """Resident adapters held in slot stacks (routable without being attached to the model)."""
        with self._lock:
            return set(self._table.slots)

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
                self._make_resident(name)
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
            self._make_resident(name)
            self._entries[name].pinned = True

    def unpin(self, name: str) -> None:
        with self._lock:
            self._entry(name).pinned = False

    # -- internals -------------------------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise LorakitError(f"unknown adapter {name!r}; registered: {sorted(self._entries) or 'none'}")
        return self._entries[name]

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
        with self._rng_kept():
            attach_adapter(self.model, entry.config, entry.tensors, name, entry.source, activate=False)

    def _rng_kept(self) -> Any:
        """A context in which random draws leave the global RNG (CPU and the model's CUDA device) as it was."""
        device = next(self.model.parameters()).device
        return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def _make_resident(self, name: str) -> None:
        if name not in self._resident:
            entry = self._entries[name]
            if not entry.factors:
                self._attach_to_model(name, entry)
            self._place(name)
        self._resident.move_to_end(name)

    def _place(self, name: str) -> None:
        """Record ``name`` as resident: attached already, or (factorable) packed into its slot of each layer."""
        self._resident[name] = None
        factors = self._entries[name].factors
        if factors:
            self._table.assign(name)
            for path, (b_eff, a_eff) in factors.items():
                self.model.get_submodule(path).stack.put(name, b_eff, a_eff)

    def _detach(self, name: str) -> None:
        del self._resident[name]
        factors = self._entries[name].factors
        if not factors:
            delete_adapter(self.model, name)
            return
        for path in factors:
            self.model.get_submodule(path).stack.drop(name)
        self._table.free(name)


def _compensations(model: nn.Module, config: AdapterConfig, source: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """Layer path -> the canonical ``(U, D)`` of the base rewrite ``W <- W - U D`` that ``config``'s initialiser
    (PiSSA, OLoRA, ...) would make, computed on the stock base without touching it; empty when it makes none."""
    try:
        built, _ = build_adapters(model, config)
        pending = {path: adapter.pending_compensation() for path, _, _, adapter in built}
    except LorakitError as exc:
        raise AdapterFileError(f"{source}: {exc}") from None
    return {path: (up.detach(), down.detach()) for path, found in pending.items() if found is not None
            for up, down in [found]}


def _to_host(factor: Tensor) -> Tensor:
    """``factor`` detached, in host memory; no copy when it is there already (the adapter it came from is deleted
    right after, so the file's tensors are copied once, into the validating adapter)."""
    return factor.detach().to("cpu")
