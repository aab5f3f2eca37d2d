"""Whole modules trained and saved with an adapter (PEFT's ``modules_to_save``): a classifier head, new embeddings.

An adapter config's ``modules_to_save`` names modules (each name matches a module whose full name equals it or ends
with ``"." + name``). :func:`lorakit.adapt` replaces each such module in place by a :class:`SavedModule` holding the
``original_module`` and, per adapter, a fully trainable deep copy under ``modules_to_save.<adapter>``. Its forward runs
one whole module, chosen by the same state the host layers follow:

* adapters disabled (``lorakit.disable``): the original;
* the active adapters (``set_active``): the copy of the one that has a copy here, else the original (two active
  adapters with their own copy of one module are refused: a whole module cannot be summed);
* ``lorakit.route``: the module every row agrees on (the copy of the rows' adapter, the original for rows of the base
  or of adapters without a copy). Rows that would need different modules are refused: a whole-module swap cannot
  serve them;
* ``lorakit.mix``: the original when none of the mixed adapters has a copy here, else refused (whole modules cannot be
  weighted).

``trainable_parameters(model, name)`` includes the copies, ``save_adapter`` writes them under PEFT's keys
(``base_model.model.<module path>.<tensor>``, the adapter name dropped) with the config's ``modules_to_save``, and
``load_adapter`` reads them back, also from folders PEFT saved. ``delete_adapter`` drops the adapter's copies (the
original comes back when none is left); ``unload`` puts the originals back, or with ``merge_active=True`` the active
adapter's copy. Adapters never target a module to save or anything inside one (PEFT's rule).
"""
from __future__ import annotations

import copy
from typing import Any, Iterator, Sequence

from torch import nn

from .errors import LorakitError
from .hosts.host import HostLayer
from .routing.rows import RowRouting
from .routing.strategy import Routing
from .routing.weighted import WeightedRouting


class SavedModule(nn.Module):
    """A module to save: ``original_module`` plus a trainable copy per adapter in ``modules_to_save``."""

    def __init__(self, original: nn.Module, path: str) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.path = path
        self.active: tuple[str, ...] = ()  # kept in step with the host layers' by lorakit.set_active
        self.disabled = False
        self.routing: Routing | None = None  # the batch's strategy (lorakit.route / lorakit.mix); None: the active ones
        self.train(original.training)

    def add(self, name: str) -> None:
        """Give adapter ``name`` its own trainable copy of the original module."""
        if name in self.modules_to_save:
            raise LorakitError(f"module {self.path!r} already has a copy for adapter {name!r}")
        module = copy.deepcopy(self.original_module)
        module.requires_grad_(True)
        self.modules_to_save[name] = module

    def remove(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active = tuple(a for a in self.active if a != name)

    def _active_module(self) -> nn.Module:
        names = [n for n in self.active if n in self.modules_to_save]
        if len(names) > 1:
            raise LorakitError(f"adapters {names} are active together but each has its own copy of {self.path!r} "
                               "(modules_to_save); a whole module cannot be summed: activate one of them")
        return self.modules_to_save[names[0]] if names else self.original_module

    def _module_for(self, name: str | None) -> nn.Module:
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

    def chosen(self) -> nn.Module:
        """The module the next forward runs (see the module docstring for the rules)."""
        if self.disabled:
            return self.original_module
        routing = self.routing
        if isinstance(routing, RowRouting):
            for mixture in routing.mixtures.values():
                self._refuse_weighted(mixture)
            picked = {id(m): m for m in (self._module_for(n) for n in dict.fromkeys(routing.names))}
            if len(picked) > 1:
                owners = sorted({str(n) for n in routing.names if n in self.modules_to_save})
                raise LorakitError(
                    f"route(): the rows use different versions of {self.path!r} (adapters {owners} have their own "
                    "copy, saved with modules_to_save, other rows use another one or the original); a whole-module "
                    "swap cannot serve them in one batch: route rows that agree on this module together")
            return next(iter(picked.values()))
        if isinstance(routing, WeightedRouting):
            self._refuse_weighted(routing)
            return self.original_module
        return self._active_module()  # ActiveSum and other strategies follow the active adapters

    def _refuse_weighted(self, routing: WeightedRouting) -> None:
        owners = [n for n in routing.names if n in self.modules_to_save]
        if owners:
            raise LorakitError(f"mix(): adapters {owners} have their own copy of {self.path!r} (modules_to_save); "
                               "whole modules cannot be weighted: activate one adapter instead")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.chosen()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks (``weight``, ``num_embeddings``, ...) are the active module's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "_modules" not in self.__dict__ or name in ("original_module",
                                                                                    "modules_to_save"):
                raise
            return getattr(self._active_module(), name)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, copies={list(self.modules_to_save)}, active={list(self.active)}"


def saved_modules(model: nn.Module) -> Iterator[SavedModule]:
    """Every :class:`SavedModule` of ``model``, in module order."""
    for module in model.modules():
        if isinstance(module, SavedModule):
            yield module


def _named(path: str, names: Sequence[str]) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def resolve(model: nn.Module, names: Sequence[str], adapter: str | None = None) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every module ``names`` selects (a :class:`SavedModule` stands for its original), checked.

    Names that match nothing are ignored when another one matches (PEFT writes its task's default names, such as
    ``["classifier", "score"]``, whether the model has them or not); when none matches, a clear error. A module to
    save may not be, contain or sit inside an adapted layer or another module to save.
    """
    found: list[tuple[str, nn.Module]] = []
    outer: list[str] = []  # SavedModule / HostLayer paths: their insides are not candidates
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in outer):
            continue
        if isinstance(module, (SavedModule, HostLayer)):
            outer.append(path)
        if path and _named(path, names):
            found.append((path, module))
    if not found:
        candidates = [p for p, m in model.named_children()][:12]
        owner = "" if adapter is None else f" (adapter {adapter!r})"
        raise LorakitError(f"modules_to_save={list(names)}{owner} matched no module of this model; "
                           f"its top-level modules: {candidates}")
    for path, module in found:
        if isinstance(module, HostLayer):
            raise LorakitError(f"modules_to_save: {path!r} is adapted by {sorted(module.adapters)}; a module cannot be "
                               "both adapted and saved whole: take it out of the targets (or of modules_to_save)")
        inner = [type(m).__name__ for m in module.modules() if m is not module
                 and isinstance(m, (SavedModule, HostLayer))]
        if inner and not isinstance(module, SavedModule):
            raise LorakitError(f"modules_to_save: {path!r} contains adapted layers or modules to save ({inner[0]}); "
                               "save a module that holds no adapter, or name the inner module instead")
        if any(path.startswith(p + ".") for p, _ in found):
            raise LorakitError(f"modules_to_save: {path!r} lies inside another module to save; name only one of them")
    return found


def saved_paths(model: nn.Module) -> list[str]:
    """Paths of the model's modules to save (adapters never target anything inside them)."""
    return [m.path for m in saved_modules(model)]


def inside(path: str, prefixes: Sequence[str]) -> bool:
    """Whether module ``path`` is one of ``prefixes`` or lies inside one of them."""
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def check_active(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse activating together two adapters that each have their own copy of one module."""
    for wrapper in saved_modules(model):
        owners = [n for n in names if n in wrapper.modules_to_save]
        if len(owners) > 1:
            raise LorakitError(f"adapters {owners} each have their own copy of {wrapper.path!r} (modules_to_save); "
                               "a whole module cannot be summed: activate one of them at a time")
