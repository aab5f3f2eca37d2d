"""LoLDU (Shi et al., 2024; METHODS.md entry 26): train the diagonal of an LDU decomposition of each weight.

    W = P L U = P L diag(D) U',   U' = diag(D)^{-1} U (unit upper triangular)
    W' = W_res + sigma P L_r diag(z) U'_r,   W_res = W - sigma0 P L_r diag(D_r) U'_r

``P L_r`` (``(rows, r)``, the permutation applied, so no dense ``P`` is stored) and ``U'_r`` (``(r, cols)``) are
frozen; ``z`` (``(r,)``, starts at ``D_r``) and the scalar ``sigma`` (starts at ``alpha / r``) are trained:
``r + 1`` parameters per layer. Here ``delta = P L_r diag(sigma z - sigma0 D_r) U'_r`` (see :mod:`.diagonal`).
Works for rectangular weights (``torch.linalg.lu`` with partial pivoting); a zero pivot leaves its row of ``U``
unnormalised (its ``z`` starts at zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, require_rank_and_alpha
from .base import register_method
from .diagonal import FrozenBasesDiagonal


@dataclass(frozen=True)
class LolduConfig(AdapterConfig):
    """Config of a LoLDU adapter.

    Attributes:
        r: number of diagonal entries trained (capped at ``min(rows, cols)`` of the layer's weight matrix).
        alpha: ``sigma`` starts at ``alpha / r``.
    """

    r: int = 8
    alpha: float = 8.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_rank_and_alpha(self.r, self.alpha)


def ldu(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(P, L, D, U')`` with ``w = P L diag(D) U'``: ``(rows, rows)``, ``(rows, k)``, ``(k,)``, ``(k, cols)``."""
    p, lower, upper = torch.linalg.lu(w)
    d = torch.diagonal(upper).clone()  # (k,)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return p, lower, d, upper / safe[:, None]


@register_method("loldu", LolduConfig)
class Loldu(FrozenBasesDiagonal):
    def decompose(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p, lower, d, upper = ldu(w)
        r = min(self.config.r, d.shape[0])
        return p @ lower[:, :r], d[:r], upper[:r]

    def init_diagonal(self, d0: Tensor) -> None:
        sigma0 = torch.tensor(self.config.alpha / d0.shape[0], dtype=d0.dtype)
        self.lora_z = nn.Parameter(d0.clone())  # (r,)
        self.lora_sigma = nn.Parameter(sigma0.clone())  # ()
        self.register_buffer("lora_z0", d0.clone())
        self.register_buffer("lora_sigma0", sigma0)

    def diagonal(self) -> Tensor:
        return self.lora_sigma * self.lora_z - self.lora_sigma0 * self.lora_z0

    def trainable(self) -> dict[str, nn.Parameter]:
        return {"lora_z": self.lora_z, "lora_sigma": self.lora_sigma}
