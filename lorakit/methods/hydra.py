"""Hydra (Kim et al., 2023; METHODS.md entry 1): a parallel and a sequential low-rank branch.

    h = W0 x + s B_p A_p x + s B_s A_s (W0 x)      =>      W' = (I + s B_s A_s) W0 + s B_p A_p

The parallel branch (``B_p A_p``, LoRA's ``lora_A`` / ``lora_B``) learns new features from the input; the
sequential branch (``A_s: (r, d_out)``, ``B_s: (d_out, r)``) re-mixes the frozen layer's own output. ``B_p = B_s = 0``
at init, so the adapted layer starts as the base layer; with ``B_s = 0`` Hydra is exactly LoRA.

The sequential branch reads ``W0 x`` from the base layer's output (the bias removed), so it costs two rank-``r``
products on ``d_out`` features and never forms ``B_s A_s W0``. On convolutions ``A_s``/``B_s`` mix output channels
(1x1 products after the base convolution). Merging folds the sequential branch in as the output-side map
``I + s B_s A_s`` (``Adapter.merge_map``), which the host inverts on unmerge.

Assumed (the paper gives no scale or rank split): both branches share rank ``r`` and LoRA's scale ``s = alpha / r``
and initialisation (Kaiming-uniform ``A``, zero ``B``); the base bias is not fed to the sequential branch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import require
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from .base import Capabilities, base_product, over_output_units, register_method
from .lora import Lora, LoraConfig, _Factor


@dataclass(frozen=True)
class HydraConfig(LoraConfig):
    """Hydra takes LoRA's fields; ``r``, ``alpha`` and ``init`` apply to both branches."""


@register_method("hydra", HydraConfig)
class Hydra(Lora):
    """``delta(x) = s B_p A_p x + s B_s A_s (W0 x)``."""

    capabilities = Capabilities(layers=frozenset({"linear", "conv"}))

    def __init__(self, geometry: Geometry, config: HydraConfig, base: Backend) -> None:
        require(not config.lora_bias, "lora_bias", True, "is not supported with Hydra")
        super().__init__(geometry, config, base)
        self.seq_A = _Factor((config.r, geometry.d_out))
        self.seq_B = _Factor((geometry.d_out, config.r))
        self._init_sequential(config.init)
        self.seq_A.to(self.a)
        self.seq_B.to(self.a)

    @torch.no_grad()
    def _init_sequential(self, init: str) -> None:
        a, b = self.seq_A.weight, self.seq_B.weight
        if init == "random":
            nn.init.normal_(a, std=a.shape[1] ** -0.5)
            nn.init.normal_(b, std=b.shape[1] ** -0.5)
        else:
            nn.init.kaiming_uniform_(a, a=5 ** 0.5)
            nn.init.zeros_(b)

    def _mix_output(self, y: Tensor) -> Tensor:  # (..., d_out) -> (..., d_out)
        return F.linear(F.linear(y, self.seq_A.weight), self.seq_B.weight) * self.scale

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        w0x = base_product(self.geometry, base_out, base).to(self.a.dtype)
        sequential = over_output_units(self.geometry, w0x, self._mix_output)  # s B_s A_s W0 x
        return (self.lora_out(x) + sequential).to(base_out.dtype)

    def fused_forward(self, x: Tensor, base: Backend) -> Tensor | None:
        return None  # LoRA's fused kernel has no sequential branch

    def merge_map(self, base: Backend) -> Tensor:
        eye = torch.eye(self.geometry.d_out, device=self.a.device, dtype=torch.float32)
        return eye + self.scale * (self.seq_B.weight.float() @ self.seq_A.weight.float())  # (d_out, d_out)

    def factors(self) -> None:
        return None  # the sequential branch's update depends on W0
