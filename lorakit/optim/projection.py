"""Gradient low-rank projection shared by GaLore, Fira and Natural GaLore (METHODS.md entries 33-35).

For a weight ``W`` of shape ``(m, n)`` the projector ``P`` spans the top-``r`` singular vectors of the gradient on the
*smaller* side, so the projected gradient (and every optimizer moment) has ``r * max(m, n)`` entries:

    m <= n ("left"):   P = U[:, :r]  (m, r),    R = P^T G  (r, n),    back: P N  (m, n)
    m >  n ("right"):  P = V[:, :r]  (n, r),    R = G P    (m, r),    back: N P^T  (m, n)

Refreshes are staggered: tensor ``i`` of ``N`` projected tensors refreshes when its own step count ``t > 0`` satisfies
``(t + offset_i) % T == 0`` with ``offset_i = floor(i * T / N)``, so no step refreshes more than ``ceil(N / T)``
projectors (GaLore refreshes all of them on the same step: a latency spike every ``T`` steps).
"""
from __future__ import annotations

import torch
from torch import Tensor


def projects_left(shape: torch.Size | tuple[int, ...]) -> bool:
    """True when the projector acts on the rows (``m <= n``), i.e. it is ``(m, r)``."""
    return shape[0] <= shape[1]


def projected_shape(shape: torch.Size | tuple[int, ...], rank: int) -> tuple[int, int]:
    """Shape of the projected gradient (and of each optimizer moment) of an ``(m, n)`` weight at ``rank``."""
    m, n = shape
    return (rank, n) if projects_left(shape) else (m, rank)


@torch.no_grad()
def fit_projector(grad: Tensor, rank: int) -> Tensor:
    """The ``(min(m, n), rank)`` orthonormal projector from the gradient's SVD (computed in float32)."""
    g = grad.float()
    if projects_left(grad.shape):
        u, _, _ = torch.linalg.svd(g, full_matrices=False)
        p = u[:, :rank]
    else:
        _, _, vh = torch.linalg.svd(g, full_matrices=False)
        p = vh[:rank].T
    return p.to(grad.dtype).contiguous()


def project(grad: Tensor, projector: Tensor) -> Tensor:
    """``P^T G`` (left) or ``G P`` (right)."""
    return projector.T @ grad if projects_left(grad.shape) else grad @ projector


def project_back(low: Tensor, projector: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """``P N`` (left) or ``N P^T`` (right): back to the weight's ``shape``."""
    return projector @ low if projects_left(shape) else low @ projector.T


def refresh_offset(index: int, count: int, gap: int) -> int:
    """Stagger offset of projected tensor ``index`` of ``count``: ``floor(index * gap / count)``."""
    return (index * gap) // max(count, 1)


def due(step: int, offset: int, gap: int) -> bool:
    """Whether a tensor that has taken ``step`` updates refreshes its projector before the next one."""
    return step == 0 or (step + offset) % gap == 0
