"""Block-LoRA (METHODS.md entry 6; "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based
Few-Shot Learning"): LoRA's factors split into ``n`` blocks, with every down-projection block shared.

    B = [B_1 ... B_n],   A = [A_s; ...; A_s]    =>    dW x = s * sum_i B_i (A_s x) = s * (sum_i B_i) (A_s x)

The paper's structure (its abstract, the only text in /work/shared/papers/) partitions ``B A`` into sub-matrices and
shares the down-projection; nothing in it breaks the symmetry between the ``B_i`` (no block layout of the input or
output, no distinct initialisation). The update depends on the ``B_i`` only through their sum, and every ``B_i``
receives the same gradient ``dL/d(sum_i B_i)``, so ``n`` stored copies add nothing but memory. This module stores
what the update is: ``A_s: (r/n, d_in)`` (``block_A``) and ``B = sum_i B_i: (d_out, r/n)`` (``block_B``), zero at
init, and computes ``A_s x`` once followed by one product, as the paper describes. Trained tensors:
``(r/n) (d_out + d_in)`` per layer (the copy layout held ``n d_out (r/n) + (r/n) d_in``).

Training dynamics. With copies starting equal (all zero), an optimizer step moves each copy by the same amount, so
it moves the sum ``n`` times as far as one tensor receiving the same gradient would. Training ``block_B`` at learning
rate ``n lr`` and weight decay ``weight_decay / n`` (``A_s`` at ``lr, weight_decay``) reproduces the copy layout's
trajectory exactly under SGD (with momentum, L2 decay), Adam and AdamW; at one learning rate for all tensors this
adapter trains ``B`` ``n`` times more slowly than the copy layout did. ``block_B`` is declared as the up-projection,
so ``parameter_roles`` finds it (LoRA+ with ``ratio=n`` and no weight decay gives the copy layout's AdamW steps).

Assumed: the literal reading above, LoRA's Kaiming-uniform ``A_s`` and zero ``B``, and ``s = alpha / r``. Files saved
with the earlier copy layout (``block_B`` of shape ``(n, d_out, r/n)``) are refused by the loader's shape check.
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
        r: total rank of ``B = [B_1 ... B_n]`` (each block, and the stored update, has rank ``r / n``).
        n: number of blocks (must divide ``r``); train ``block_B`` at ``n`` times the learning rate to match ``n``
            separately stored blocks (see the module docstring).
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
    """``delta(x) = s B (A_s x)`` with ``B = sum_i B_i`` stored once."""

    capabilities = Capabilities(factorable=True)

    def __init__(self, geometry: Geometry, config: BlockLoraConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        block = config.r // config.n
        self.scale = config.alpha / config.r
        self.block_A = nn.Parameter(torch.empty(geometry.down_shape(block)))  # A_s: (r/n, d_in[, *kernel])
        nn.init.kaiming_uniform_(self.block_A, a=math.sqrt(5))
        self.block_B = nn.Parameter(torch.zeros(geometry.up_shape(block)))  # sum_i B_i: (d_out, r/n[, 1...])
        w = base.weight()
        self.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        if x.is_floating_point():  # embeddings take token ids
            x = x.to(self.block_A.dtype)
        h = self.geometry.down(x, self.block_A)  # (..., r/n): computed once, shared by every block
        return (self.geometry.up(h, self.block_B) * self.scale).to(base_out.dtype)

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        return self.geometry.compose(self.block_B, self.block_A) * self.scale

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.geometry.factored(self.block_B * self.scale, self.block_A)

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def up_projections(self) -> dict[str, nn.Parameter]:
        return {"block_B": self.block_B}
