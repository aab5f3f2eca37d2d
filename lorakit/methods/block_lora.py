"""Block-LoRA (METHODS.md entry 6, "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based
Few-Shot Learning"): LoRA's factors split into ``n`` blocks, with every down-projection block shared.

    B = [B_1 ... B_n],   A = [A_s; ...; A_s]    =>    dW x = s * sum_i B_i (A_s x) = s * (sum_i B_i) (A_s x)

``A_s: (r/n, d_in)`` is computed once per input and the ``n`` products ``B_i (A_s x)`` become one matrix *addition*
``sum_i B_i`` followed by one product, as the paper describes. ``B_i: (d_out, r/n)`` start at zero.

Read literally (as METHODS.md cautions) the update equals a rank-``r/n`` LoRA whose up-projection is ``sum_i B_i``;
what differs is the parameter count ``n d_out (r/n) + (r/n) d_in`` and the training dynamics (every ``B_i`` gets
the same gradient). Assumed: this literal reading (the abstract gives no other block layout), LoRA's
Kaiming-uniform ``A_s`` and ``s = alpha / r``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import require
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from .base import Adapter, Capabilities, register_method


@dataclass(frozen=True)
class BlockLoraConfig(AdapterConfig):
    """Config of a Block-LoRA adapter.

    Attributes:
        r: total rank of ``B = [B_1 ... B_n]`` (each block has rank ``r / n``).
        n: number of blocks (must divide ``r``).
        alpha: the update is scaled by ``alpha / r``.
    """

    r: int = 8
    n: int = 4
    alpha: float = 8.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.r, int) and self.r >= 1, "r", self.r, "must be a positive integer")
        require(isinstance(self.n, int) and self.n >= 1 and self.r % self.n == 0, "n", self.n,
                f"must be a positive integer dividing r={self.r}")
        require(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha", self.alpha, "must be > 0")


@register_method("block-lora", BlockLoraConfig)
class BlockLora(Adapter):
    """``delta(x) = s (sum_i B_i) (A_s x)``."""

    capabilities = Capabilities(factorable=True)

    def __init__(self, geometry: Geometry, config: BlockLoraConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        block = config.r // config.n
        self.scale = config.alpha / config.r
        self.block_A = nn.Parameter(torch.empty(geometry.down_shape(block)))  # A_s: (r/n, d_in[, *kernel])
        nn.init.kaiming_uniform_(self.block_A, a=math.sqrt(5))
        self.block_B = nn.Parameter(torch.zeros(config.n, *geometry.up_shape(block)))  # B_i: (d_out, r/n[, 1...])
        w = base.weight()
        self.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)

    def up(self) -> Tensor:  # sum_i B_i: (d_out, r/n[, 1...])
        return self.block_B.sum(0)

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        if x.is_floating_point():  # embeddings take token ids
            x = x.to(self.block_A.dtype)
        h = self.geometry.down(x, self.block_A)  # (..., r/n): computed once, shared by every block
        return (self.geometry.up(h, self.up()) * self.scale).to(base_out.dtype)

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        return self.geometry.compose(self.up(), self.block_A) * self.scale

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.geometry.factored(self.up() * self.scale, self.block_A)

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())
