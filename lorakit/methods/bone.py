"""Bone / MiSS: block-shared weight update (Kang & Yin, 2024; METHODS.md entry 10; PEFT's MiSS is the peer).

    dW[:, j*r:(j+1)*r] = M^T  for every input block j,    M: (r, d_out),  zero at init

so ``dW x = M^T sum_j x_j`` with ``x_j`` the ``r``-sized chunks of ``x`` (the last one zero-padded when ``r`` does
not divide ``d_in``, as PEFT does): one reduction over chunks and one ``(r -> d_out)`` product, never ``dW``.
The update is exactly ``M^T S`` with ``S: (r, d_in)`` the tiled identity, so :meth:`Bone.factors` is exact.

``variant="mini"`` (PEFT's ``init_weights="mini"``) trains only ``M: (r, mini_r)`` and repeats it across the
``d_out / mini_r`` output groups.

Assumed / not implemented: the paper's "Bat" form ``dW_ij = W_ij M_i + M_i`` depends on ``W0`` and needs the
inverse of ``I + M_i`` to unmerge, which lorakit's additive merge protocol does not express; it is not offered
(PEFT files with ``init_weights="bat"`` are refused). The default ``r`` is 8 (PEFT's is 64) so that the default
config fits small layers; ``r <= d_in`` is required as in PEFT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import require
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from .base import Adapter, Capabilities, register_method

BONE_VARIANTS = ("miss", "mini")


@dataclass(frozen=True)
class BoneConfig(AdapterConfig):
    """Config of a Bone / MiSS adapter.

    Attributes:
        r: block size (the shared block is ``d_out x r``); at most ``d_in`` of every targeted layer.
        variant: ``"miss"`` (one ``(r, d_out)`` block) or ``"mini"`` (an ``(r, mini_r)`` block repeated over outputs).
        mini_r: output-group size of the ``"mini"`` variant; must divide ``d_out``.
        dropout: dropout probability on the adapter's input.
    """

    r: int = 8
    variant: str = "miss"
    mini_r: int = 1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.r, int) and self.r >= 1, "r", self.r, "must be a positive integer")
        require(self.variant in BONE_VARIANTS, "variant", self.variant, f"must be one of {', '.join(BONE_VARIANTS)}")
        require(isinstance(self.mini_r, int) and self.mini_r >= 1, "mini_r", self.mini_r, "must be a positive integer")
        require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")


@register_method("bone", BoneConfig)
class Bone(Adapter):
    """``delta(x) = (sum of x's r-chunks) @ M`` with ``M`` shared by every input block."""

    capabilities = Capabilities(layers=frozenset({"linear"}), factorable=True)

    def __init__(self, geometry: Geometry, config: BoneConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        require(config.r <= geometry.d_in, "r", config.r, f"must be <= the layer's d_in ({geometry.d_in})")
        mini = config.variant == "mini"
        require(not mini or geometry.d_out % config.mini_r == 0, "mini_r", config.mini_r,
                f"must divide the layer's d_out ({geometry.d_out})")
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        w = base.weight()
        self.miss_block = nn.Parameter(torch.zeros(config.r, config.mini_r if mini else geometry.d_out,
                                                   device=w.device, dtype=w.dtype))

    def block(self) -> Tensor:  # (r, d_out)
        if self.config.variant == "mini":
            return self.miss_block.repeat(1, self.geometry.d_out // self.config.mini_r)
        return self.miss_block

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        r = self.config.r
        x = self.dropout(x.to(self.miss_block.dtype))
        if x.shape[-1] % r:  # zero-pad the last block (a copy, so only when needed)
            x = F.pad(x, (0, -x.shape[-1] % r))  # (..., n_blocks * r)
        chunks = x.reshape(*x.shape[:-1], -1, r).sum(-2)  # (..., r)
        return (chunks @ self.block()).to(base_out.dtype)  # (..., d_out)

    def tiling(self) -> Tensor:
        """``S: (r, d_in)`` with ``S[c, j*r + c] = 1``: the input-side factor of ``dW = M^T S``."""
        r, d_in = self.config.r, self.geometry.d_in
        eye = torch.eye(r, device=self.miss_block.device, dtype=self.miss_block.dtype)
        return eye.repeat(1, -(-d_in // r))[:, :d_in]

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        return self.block().t() @ self.tiling()  # (d_out, d_in)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.block().t(), self.tiling()

    def trainable(self) -> dict[str, nn.Parameter]:
        return {"miss_block": self.miss_block}
