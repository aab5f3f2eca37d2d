"""``W ≈ Q + L1 L2``: quantised part plus low rank, by alternating quantisation and truncated SVD.

The iteration of LQ-LoRA (Guo et al., 2024, Algorithm 1; METHODS.md entry 40) and of LoftQ (Li et al., 2023):

    Q_t = quant(W - L_{t-1}),     L_t = SVD_r(W - Q_t)          (L_0 = 0)

keeping the best iterate. With a diagonal Fisher ``F`` approximated by ``d_row d_col^T`` the L-step is the exact
weighted SVD ``D_r^{-1/2} SVD_r(D_r^{1/2} (W - Q) D_c^{1/2}) D_c^{-1/2}``. Used by the ``loftq`` initialiser and by
:mod:`lorakit.quant.lq_lora`; ``quant`` is a codec of :mod:`lorakit.hosts.codecs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import require
from ..hosts.codecs import Codec, check_available
from .linalg import top_svd


@dataclass(frozen=True)
class Decomposition:
    """``W ≈ q + l1 @ l2`` for one matrix.

    Attributes:
        source: the matrix that was quantised (``W - L_{t-1}``); quantising it again with the same codec gives ``q``.
        q: the dequantised quantised part ``(rows, cols)``.
        l1, l2: ``(rows, r)``, ``(r, cols)`` low-rank factors.
        errors: the (weighted) squared error ``||W - Q_t - L_t||^2`` of every iteration.
        best: the iteration kept.
    """

    source: Tensor
    q: Tensor
    l1: Tensor
    l2: Tensor
    errors: list[float] = field(default_factory=list)
    best: int = 0

    @property
    def error(self) -> float:
        return self.errors[self.best]


def fisher_scales(fisher: Tensor) -> tuple[Tensor, Tensor]:
    """``(d_row, d_col)``: the row and column means of a diagonal Fisher ``(rows, cols)``, floored above zero."""
    require(bool((fisher >= 0).all()), "fisher", "a matrix with negative entries", "must be non-negative")
    f = fisher.float()
    floor = f.mean().clamp_min(1e-30) * 1e-6
    return f.mean(dim=1).clamp_min(floor), f.mean(dim=0).clamp_min(floor)


def decompose(w: Tensor, r: int, scheme: str = "nf3", block: int = 64, iters: int = 10, backend: str = "lorakit",
              fisher: Tensor | None = None) -> Decomposition:
    """LQ-LoRA's (optionally Fisher-weighted) decomposition of ``w`` (``(rows, cols)``) with rank ``r``."""
    require(isinstance(iters, int) and iters >= 1, "iters", iters, "must be a positive integer")
    require(isinstance(r, int) and 1 <= r <= min(w.shape), "r", r, f"must be in [1, {min(w.shape)}]")
    codec: Codec = check_available(backend)
    w = w.detach().float()
    if fisher is None:
        row, col = w.new_ones(w.shape[0]), w.new_ones(w.shape[1])
    else:
        require(fisher.shape == w.shape, "fisher", tuple(fisher.shape),
                f"must have the weight's shape {tuple(w.shape)}")
        row, col = fisher_scales(fisher.to(w.device))
    rs, cs = row.sqrt()[:, None], col.sqrt()[None, :]  # (rows, 1), (1, cols)
    low_rank = torch.zeros_like(w)
    best: Decomposition | None = None
    errors: list[float] = []
    for t in range(iters):
        source = w - low_rank
        q = codec.fake_quantize(source, scheme, block).float()
        u, s, vh = top_svd(rs * (w - q) * cs, r)  # weighted SVD, (rows, r), (r,), (r, cols)
        l1, l2 = (u * s.sqrt()) / rs, (s.sqrt()[:, None] * vh) / cs
        low_rank = l1 @ l2
        errors.append(torch.linalg.norm(rs * (w - q - low_rank) * cs).square().item())
        if best is None or errors[-1] < best.error:
            best = Decomposition(source, q, l1, l2, errors, t)
    return Decomposition(best.source, best.q, best.l1, best.l2, errors, best.best)
