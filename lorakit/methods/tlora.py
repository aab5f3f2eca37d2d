"""TLoRA (Tao et al., 2025; METHODS.md entry 7): a learned full-rank transform of ``W0`` plus a compact residual.

    W' = T W0 + R,      T = sum_k  C1_k kron C2_k,      R = s B A

``T: (d_out, d_out)`` acts on the output units of the frozen weight and is parametrised as a two-core tensor-train
matrix (a Kronecker sum of TT rank ``transform_rank``) over ``d_out = n1 * n2``; it starts at the identity
(``C1_0 = I``, ``C2_0 = I``, the other ``C2_k = 0`` and ``C1_k`` small random so that they receive gradients).
``R`` is a LoRA residual (``B = 0`` at init), so ``W' = W0`` at init; with ``T = I`` frozen TLoRA is LoRA, and with a
diagonal ``T = diag(m / ||W0||)`` it reproduces DoRA's weight.

The forward never forms ``T``: ``(T - I) W0 x`` is computed from the base output ``y = W0 x`` reshaped to
``Y: (n1, n2)`` as ``sum_k C1_k Y C2_k^T - Y`` (``O(rho d_out (n1 + n2))`` per position). On convolutions ``T`` mixes
output channels and ``R`` is LoRA's convolution pair. Merging uses the output-map protocol (``Adapter.merge_map``).

Assumed (the abstract names "tensor decompositions" without fixing them): ``T`` acts on the left (output side,
as DoRA's rescaling does), is a two-core TT matrix with ``(n1, n2) = factorization(d_out, transform_factor)``
(LoKr's near-square rule; a prime ``d_out`` gives ``n1 = 1``, a dense ``T``), and ``R`` is a matrix LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import require
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from .base import Capabilities, base_product, over_output_units, register_method
from .kron import factorization
from .lora import Lora, LoraConfig


@dataclass(frozen=True)
class TloraConfig(LoraConfig):
    """Config of a TLoRA adapter: LoRA's fields for the residual ``R``, plus the transform's shape.

    Attributes:
        transform_rank: TT rank ``rho`` of the transform ``T`` (number of Kronecker terms).
        transform_factor: the size ``n1`` aims for in ``d_out = n1 * n2`` (``-1``: near ``sqrt(d_out)``).
        transform_init_std: std of the random ``C1_k`` (``k >= 1``) at init (their ``C2_k`` start at zero).
    """

    transform_rank: int = 2
    transform_factor: int = -1
    transform_init_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.transform_rank, int) and self.transform_rank >= 1, "transform_rank",
                self.transform_rank, "must be a positive integer")
        require(isinstance(self.transform_factor, int) and (self.transform_factor == -1 or self.transform_factor >= 1),
                "transform_factor", self.transform_factor, "must be -1 or a positive integer")
        require(isinstance(self.transform_init_std, (int, float)) and self.transform_init_std >= 0,
                "transform_init_std", self.transform_init_std, "must be >= 0")


@register_method("tlora", TloraConfig)
class Tlora(Lora):
    """``delta(x) = (T - I) W0 x + s B A x`` with ``T`` a Kronecker sum over ``d_out = n1 * n2``."""

    capabilities = Capabilities(layers=frozenset({"linear", "conv"}))

    def __init__(self, geometry: Geometry, config: TloraConfig, base: Backend) -> None:
        require(not config.lora_bias, "lora_bias", True, "is not supported with TLoRA")
        super().__init__(geometry, config, base)
        rho = config.transform_rank
        self.n1, self.n2 = factorization(geometry.d_out, config.transform_factor)
        self.transform_core_1 = nn.Parameter(torch.zeros(rho, self.n1, self.n1))  # C1_k
        self.transform_core_2 = nn.Parameter(torch.zeros(rho, self.n2, self.n2))  # C2_k
        self._init_transform(config)
        self.to(self.a)

    @torch.no_grad()
    def _init_transform(self, config: TloraConfig) -> None:
        c1, c2 = self.transform_core_1, self.transform_core_2
        nn.init.normal_(c1, std=config.transform_init_std)
        c1[0] = torch.eye(self.n1)
        c2[0] = torch.eye(self.n2)
        if config.init == "random":
            c2[1:].normal_(std=config.transform_init_std)

    def _transform(self, y: Tensor) -> Tensor:
        """``(T - I) y`` on the last axis without forming ``T``."""
        grid = y.reshape(*y.shape[:-1], self.n1, self.n2)  # (..., n1, n2)
        right = torch.einsum("...ij,kbj->...kib", grid, self.transform_core_2)  # Y C2_k^T: (..., rho, n1, n2)
        ty = torch.einsum("kai,...kib->...ab", self.transform_core_1, right)  # sum_k C1_k Y C2_k^T
        return (ty - grid).reshape(y.shape)

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        w0x = base_product(self.geometry, base_out, base).to(self.a.dtype)
        return (over_output_units(self.geometry, w0x, self._transform) + self.lora_out(x)).to(base_out.dtype)

    def fused_forward(self, x: Tensor, base: Backend) -> Tensor | None:
        return None  # LoRA's fused kernel has no transform

    def transform(self) -> Tensor:
        """The dense ``T: (d_out, d_out)`` (float32), for merging and analysis."""
        c1, c2 = self.transform_core_1.float(), self.transform_core_2.float()
        return torch.einsum("kai,kbj->abij", c1, c2).reshape(self.geometry.d_out, self.geometry.d_out)

    def merge_map(self, base: Backend) -> Tensor:
        return self.transform()

    def factors(self) -> None:
        return None  # (T - I) W0 is not a low-rank product of the adapter's own tensors
