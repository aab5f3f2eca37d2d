"""The factor layout: a layer's weight seen as the ``(rows, cols)`` matrix that ``B @ A`` updates.

Linear layers: ``(d_out, d_in)``; convolutions: ``(d_out, d_in * prod(kernel))``; embeddings: the transposed table
``(dim, num_embeddings)`` (their ``A`` is looked up by token id, so ``delta = (B A)^T``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import LorakitError
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry


def to_matrix(geometry: Geometry, weight: Tensor) -> Tensor:
    """Canonical weight -> factor layout ``(rows, cols)``."""
    return weight.t() if geometry.kind == "embedding" else weight.reshape(weight.shape[0], -1)


def from_matrix(geometry: Geometry, matrix: Tensor, like: Tensor) -> Tensor:
    """Factor layout -> the canonical layout of ``like``."""
    return matrix.t() if geometry.kind == "embedding" else matrix.reshape(like.shape)


def precise(t: Tensor) -> Tensor:
    """``t`` in at least float32 (float64 stays float64): the precision initialisers compute in."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def base_matrix(geometry: Geometry, base: Backend) -> Tensor:
    """The base weight in factor layout, at least float32 (what weight-based initialisers factorise)."""
    return precise(to_matrix(geometry, base.weight().detach()))


@torch.no_grad()
def subtract_from_base(geometry: Geometry, base: Backend, delta: Tensor) -> None:
    """``W <- W - delta`` with ``delta`` in factor layout, computed in at least float32."""
    w = base.weight()
    base.set_weight(precise(w) - from_matrix(geometry, precise(delta), w))


@torch.no_grad()
def replace_base(geometry: Geometry, base: Backend, matrix: Tensor) -> None:
    """``W <- matrix`` (factor layout)."""
    base.set_weight(from_matrix(geometry, matrix, base.weight()))


def factor_dtype(base: Backend, fallback: torch.dtype) -> torch.dtype:
    """The dtype adapter factors take on this layer (the base's floating dtype), so compensation is exact."""
    w = base.weight()
    return w.dtype if w.is_floating_point() else fallback


@dataclass
class BaseRewrite:
    """A change of the frozen base an initialiser asks for, held until the adapter joins its host layer.

    Either ``W <- W - up @ down`` (compensation; ``up`` carries the scale) or ``W <- replacement``. Building an
    adapter never touches the model (``adapt`` builds every layer before attaching any; ``inspect_targets`` only
    builds); :meth:`apply` runs from ``Adapter.attach``.
    """

    up: Tensor | None = None  # (rows, r)
    down: Tensor | None = None  # (r, cols)
    replacement: Tensor | None = None  # (rows, cols)

    def apply(self, geometry: Geometry, base: Backend) -> None:
        if self.replacement is not None:
            replace_base(geometry, base, self.replacement)
        else:
            subtract_from_base(geometry, base, precise(self.up) @ precise(self.down))


class RewritesBase:
    """Mixin for adapters whose initialiser rewrites the base (PiSSA's residual, LoftQ's quantised weight): the
    rewrite waits in ``_rewrite`` until the host layer attaches the adapter (see ``HostLayer.attach``)."""

    _rewrite: BaseRewrite | None = None

    def attach(self, base: Backend) -> None:
        if self._rewrite is not None:
            self._rewrite.apply(self.geometry, base)  # type: ignore[attr-defined]
            self._rewrite = None

    @property
    def rewrites_base(self) -> bool:
        return self._rewrite is not None

    def pending_compensation(self) -> tuple[Tensor, Tensor] | None:
        rewrite = self._rewrite
        if rewrite is None:
            return None
        if rewrite.replacement is not None:
            raise LorakitError(f"init {self.config.init!r} replaces the base weight (a quantised base, LoftQ): the "  # type: ignore[attr-defined]
                               "adapter is only valid on that base, not on a shared stock one")
        return self.geometry.factored(rewrite.up, rewrite.down)  # type: ignore[attr-defined]

