"""The host layer: one base layer + any number of named adapters + routing.

``HostLayer`` replaces a supported module in the user's model. It composes three independent things: a base
backend (how the frozen weight is stored and applied), adapters (instances of registered methods), and a routing
strategy (:mod:`lorakit.routing.strategy`: the active adapters summed, an adapter per row of the batch, or weights per
token over named adapters) to which its forward delegates.
"""
from __future__ import annotations

from typing import Any, Iterator, TypeVar

import torch
from torch import Tensor, nn

from ..errors import LorakitError
from ..routing.stacked import SlotStack
from ..routing.strategy import ACTIVE, Routing
from .geometry import Geometry, geometry_of, mix_units, per_unit
from .quantized import backend_for

A = TypeVar("A", bound=nn.Module)
_UNMERGE_TOLERANCE = 1e-4  # relative error allowed when undoing a merged output map (see HostLayer.merge)


class HostLayer(nn.Module):
    """Wraps ``base_layer``; its forward is ``base(x) + sum of the routed adapters' contributions``."""

    def __init__(self, base_layer: nn.Module, path: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.train(base_layer.training)  # a host joining an eval model is in eval mode too
        self.path = path
        self.geometry: Geometry = geometry_of(base_layer)
        self.backend = backend_for(base_layer)
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self._merge_scales: dict[str, Tensor | None] = {}
        self.disabled = False
        self.routing: Routing | None = None  # the batch's strategy (lorakit.route / lorakit.mix); None: ACTIVE
        self.rewriters: list[str] = []  # adapters that rewrote the base (kept after deletion: the base stays so)
        self.stack: SlotStack | None = None  # slot tensors packed by an AdapterPool (the stacked path)

    def add(self, name: str, adapter: nn.Module) -> None:
        """Attach ``adapter`` (which may rewrite the base weight, see ``Adapter.attach``) under ``name``."""
        if name in self.adapters:
            raise LorakitError(f"layer {self.path!r} already has an adapter named {name!r}")
        self.attach(name, adapter)
        adapter.train(self.training)
        self.adapters[name] = adapter

    def attach(self, name: str, adapter: nn.Module) -> None:
        """Let ``adapter`` (named ``name``) rewrite the base if it wants to (see :meth:`check_rewrite`)."""
        self.check_rewrite(name, adapter)
        if adapter.rewrites_base:
            self.rewriters.append(name)
        adapter.attach(self.backend)

    def check_rewrite(self, name: str, adapter: nn.Module) -> None:
        """Only one adapter per layer may rewrite the base: a second residual initialisation would rewrite the
        already-rewritten base and silently change the first adapter's function (``W_res + s B A`` != ``W``)."""
        first = next((n for n in self.rewriters if n != name), None)
        if adapter.rewrites_base and first is not None:
            raise LorakitError(f"layer {self.path!r}: adapter {first!r} already rewrote the base weight (a "
                               f"residual initialisation); adapter {name!r} would rewrite it again and change "
                               f"{first!r}. Give {name!r} an initialiser that leaves the base alone")

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise LorakitError(f"adapter {name!r} is merged into {self.path!r}; unmerge it before deleting")
        del self.adapters[name]
        self.active = tuple(a for a in self.active if a != name)

    # -- merging ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: tuple[str, ...]) -> None:
        """Fold adapters into the base weight, each relative to the unmerged base as in the forward pass.

        With per-unit factors ``c_i``, output-side maps ``L_i`` and additive parts ``D_i`` (see
        ``Adapter.merge_scale`` / ``merge_map``), the merged weight is ``M W0 + sum(D_i)`` with
        ``M = I + sum(diag(c_i) - I) + sum(L_i - I)`` (diagonal unless some adapter has a map). The factors ``c_i``
        are kept (they depend on ``W0``); :meth:`unmerge` rebuilds ``M`` and divides by it, or solves with it in
        float64. A map that unmerging could not undo to ``max(1e-4, 10 eps)`` relative error (singular or badly
        conditioned ``M``) is refused here, before the base is touched.
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
        mix = self._unit_mix(todo, total, w0)
        merged = total * w0 + delta if mix is None else self._checked_mix(mix, w0, delta, todo)
        self.backend.set_weight(merged)
        self._shift_bias(todo, +1.0)
        self.merged, self._merge_scales = todo, scales

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.backend.weight()
        total, delta = self._merge_terms(self._merge_scales, weight)
        mix = self._unit_mix(self.merged, total, weight)
        merged = weight.float() - delta
        restored = merged / total if mix is None else _solve_units(mix, merged)
        if not bool(torch.isfinite(restored).all()):
            raise LorakitError(f"cannot unmerge {self.merged} from {self.path!r}: their output map became singular "
                               "after merging (were their tensors changed while merged?)")
        self.backend.set_weight(restored)
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

    def _unit_mix(self, names: list[str], total: Tensor, like: Tensor) -> Tensor | None:
        """``M = diag(total) + sum(L_i - I)`` in float64 when some adapter has an output map, else ``None``."""
        maps = [m for n in names if (m := self.adapters[n].merge_map(self.backend)) is not None]
        if not maps:
            return None
        d_out = like.shape[0]
        mix = torch.diag(total.double().reshape(-1).expand(d_out)) - len(maps) * torch.eye(
            d_out, dtype=torch.float64, device=like.device)
        for m in maps:
            mix = mix + m.double()
        return mix

    def _checked_mix(self, mix: Tensor, w0: Tensor, delta: Tensor, names: list[str]) -> Tensor:
        """``M W0 + D``, after checking that unmerging it (at the weight's precision) gives ``W0`` back."""
        merged = (mix_units(mix, w0.double()) + delta.double()).float()
        stored = merged.to(self.backend.weight().dtype).float()
        restored = _solve_units(mix, stored - delta)
        error = float((restored - w0).norm() / w0.norm().clamp_min(1e-30))
        tolerance = max(_UNMERGE_TOLERANCE, 10 * torch.finfo(self.backend.weight().dtype).eps)
        if not error <= tolerance:  # also catches nan from a singular M
            raise LorakitError(
                f"cannot merge {names} into {self.path!r}: their combined output map is singular or too badly "
                f"conditioned (unmerging would restore the base weight only to {error:.3g} relative error, more than "
                f"{tolerance:.1e}); keep them unmerged"
            )
        return merged

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
        routing = ACTIVE if self.routing is None else self.routing
        routing.check(self)
        return routing.forward(self, x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, adapters={list(self.adapters)}, active={list(self.active)}"


def _solve_units(mix: Tensor, weight: Tensor) -> Tensor:
    """``M^-1 W`` over the output units (rows) of a canonical weight, in float64 (``nan`` where ``M`` is singular)."""
    rows, info = torch.linalg.solve_ex(mix, weight.double().reshape(weight.shape[0], -1))
    return rows.reshape(weight.shape) if int(info) == 0 else torch.full_like(weight, float("nan"))


def hosts(model: nn.Module) -> Iterator[HostLayer]:
    """Every host layer of ``model``, in module order."""
    for module in model.modules():
        if isinstance(module, HostLayer):
            yield module


def adapters_named(model: nn.Module, name: str, kind: type[A] = nn.Module) -> list[tuple[HostLayer, A]]:
    """``(host, adapter)`` for adapter ``name`` on every host layer of ``model`` that has one of class ``kind``."""
    return [(h, h.adapters[name]) for h in hosts(model) if name in h.adapters and isinstance(h.adapters[name], kind)]
