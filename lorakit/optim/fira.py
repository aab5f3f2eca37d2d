"""Fira (Chen et al., 2024; METHODS.md entry 34): GaLore plus the full-rank residual, scaled like Adam would scale it.

With ``R = P^T G`` and Adam's low-rank output ``psi(R)`` (see :mod:`.galore`):

    phi_j = ||psi(R)_j|| / ||R_j||          per column j of R (per row when projecting on the right)
    S_t   = phi * (G - P R)                  the residual GaLore discards, norm-scaled column by column
    S_t  <- S_t * gamma ||S_{t-1}|| / ||S_t||   when ||S_t|| / ||S_{t-1}|| > gamma   (norm-growth limiter)
    W    <- W - lr * alpha * (P psi(R) + S_t)

The limiter is computed on the device (``clamp`` instead of the reference code's Python ``max``), so no host
synchronisation happens per tensor. ``||S_{t-1}||`` after limiting is kept as the 0-d tensor ``residual_norm``; the
optimizer memory is GaLore's plus that one scalar per matrix. Assumed: ``alpha`` scales both terms (as in the
reference code) and the first step is not limited (there is no previous norm).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import require
from .galore import ProjectedAdamW, build_projected
from .projection import project_back, projects_left
from .registry import OPTIMIZERS

TINY = 1e-8


class Fira(ProjectedAdamW):
    """GaLore-AdamW with Fira's scaled full-rank residual; ``limit`` is the limiter's ``gamma`` (1.01)."""

    def __init__(self, *args: Any, limit: float = 1.01, **kwargs: Any) -> None:
        require(limit >= 1.0, "limit", limit, "must be >= 1 (the allowed growth of the residual's norm per step)")
        super().__init__(*args, **kwargs)
        self.limit = limit

    def init_state(self, state: dict[str, Any], p: Tensor, low_shape: tuple[int, ...]) -> None:
        state["residual_norm"] = p.new_full((), float("inf"), dtype=torch.float32)

    def full_update(self, state: dict[str, Any], grad: Tensor, low: Tensor, normalized: Tensor,
                    group: dict[str, Any]) -> Tensor:
        projector = state["projector"]
        dim = 0 if projects_left(grad.shape) else 1  # norms over the projected side: one per column (row)
        phi = normalized.norm(dim=dim, keepdim=True) / (low.norm(dim=dim, keepdim=True) + TINY)
        residual = (grad - project_back(low, projector, grad.shape)) * phi
        norm = residual.float().norm()
        shrink = (norm / (state["residual_norm"] + TINY)).clamp(min=self.limit) / self.limit
        residual.div_(shrink.to(residual.dtype))
        state["residual_norm"] = norm / shrink
        return project_back(normalized, projector, grad.shape).add_(residual)


@OPTIMIZERS.decorator("fira")
def fira(named_params: Mapping[str, nn.Parameter], *, lr: float, weight_decay: float,
         roles: Mapping[str, str] | None = None, **options: Any) -> torch.optim.Optimizer:
    """Fira-AdamW. GaLore's options plus limit (1.01)."""
    return build_projected(Fira, "fira", named_params, lr, weight_decay, options, own=("limit",))
