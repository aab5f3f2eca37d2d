"""SVFit (Sun et al., 2024; METHODS.md entry 25): train only the top-``r`` singular values of each weight.

    W = U S V^T,   W' = (W - U_r S_r V_r^T) + U_r diag(s) V_r^T,   s initialised to S_r

``U_r`` and ``V_r`` are frozen; ``r`` parameters per layer. Here ``delta = U_r diag(s - S_r) V_r^T`` (see
:mod:`.diagonal`), so ``dL/ds_i = u_i^T G v_i`` and the update keeps ``W``'s top-``r`` singular vectors. With
``energy`` set, ``r`` is the paper's rule: the fewest top singular values whose squares hold that share of
``||W||_F^2`` (capped by ``r``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import require
from .base import register_method
from .diagonal import FrozenBasesDiagonal


@dataclass(frozen=True)
class SvfitConfig(AdapterConfig):
    """Config of an SVFit adapter.

    Attributes:
        r: number of singular values trained (capped at ``min(rows, cols)`` of the layer's weight matrix).
        energy: if set, the per-layer ``r`` is the smallest count holding this share of the squared singular values.
    """

    r: int = 8
    energy: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.r, int) and self.r >= 1, "r", self.r, "must be a positive integer")
        require(self.energy is None or 0.0 < self.energy <= 1.0, "energy", self.energy, "must be in (0, 1]")


@register_method("svfit", SvfitConfig)
class Svfit(FrozenBasesDiagonal):
    def decompose(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (rows, k), (k,), (k, cols)
        r = min(self.config.r, s.shape[0])
        if self.config.energy is not None:
            share = (s**2).cumsum(0) / (s**2).sum().clamp_min(torch.finfo(s.dtype).tiny)
            r = min(r, int((share < self.config.energy).sum()) + 1)
        return u[:, :r], s[:r], vh[:r]

    def init_diagonal(self, d0: Tensor) -> None:
        self.lora_S = nn.Parameter(d0.clone())  # (r,) trained singular values
        self.register_buffer("lora_S0", d0.clone())  # (r,) their initial values

    def diagonal(self) -> Tensor:
        return self.lora_S - self.lora_S0

    def trainable(self) -> dict[str, nn.Parameter]:
        return {"lora_S": self.lora_S}
