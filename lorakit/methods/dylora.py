"""DyLoRA (Valipour et al., 2023; METHODS.md entry 28): one LoRA trained for every rank ``b`` in ``[r_min, r]``.

    h = W0 x + (alpha / b) · B[:, :b] A[:b, :] x          (rsLoRA: alpha / sqrt(b))

Training samples ``b`` each step (:class:`lorakit.rank.dylora.DyLoraSampler`, which :meth:`DyLora.training_hooks`
hands to the trainer) and runs the truncated forward, so the first ranks learn what matters most (nested dropout).
Afterwards the adapter is evaluated at any ``b`` (:func:`lorakit.rank.dylora.at_rank`) or cut to it for export
(:func:`lorakit.rank.dylora.truncate`) without retraining. ``rank = None`` (the default outside training) is the
full rank ``r``, where DyLoRA is exactly LoRA. In the paper's "frozen" mode only row/column ``b`` is trained at a
step sampled at ``b``; the first ``b - 1`` are used but detached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import AdapterConfig
from ..errors import require
from ..hosts.backend import DenseBackend
from ..hosts.geometry import Geometry
from .base import register_method
from .lora import Lora, LoraConfig


@dataclass(frozen=True)
class DyLoraConfig(LoraConfig):
    """Config of a DyLoRA adapter: ``r`` is the largest rank, ``r_min`` the smallest one sampled in training,
    ``frozen`` the paper's frozen mode (only the sampled rank's row and column are updated)."""

    r_min: int = 1
    frozen: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.r_min, int) and 1 <= self.r_min <= self.r, "r_min", self.r_min,
                f"must be an integer in [1, r={self.r}]")
        require(not self.lora_bias, "lora_bias", self.lora_bias, "is not supported by DyLoRA (its scale varies)")


@register_method("dylora", DyLoraConfig)
class DyLora(Lora):
    """LoRA whose forward, merge and factors use the first ``rank`` ranks with scale ``alpha / rank``."""

    def __init__(self, geometry: Geometry, config: DyLoraConfig, base: DenseBackend) -> None:
        super().__init__(geometry, config, base)
        self.rank: int | None = None  # the truncation in use; None: the full rank

    def set_rank(self, b: int | None) -> None:
        require(b is None or (isinstance(b, int) and b >= 1), "rank", b, "must be None or a positive integer")
        self.rank = b

    def live(self) -> tuple[Tensor, Tensor, float]:
        r = self.a.shape[0]
        b = r if self.rank is None else min(self.rank, r)
        cfg = self.config
        scale = cfg.alpha / (math.sqrt(b) if cfg.use_rslora else b)
        a, up = self.a[:b], self.b[:, :b]
        if cfg.frozen and self.training and b > 1:  # only rank b learns at this step
            a = torch.cat([a[:b - 1].detach(), a[b - 1:]], dim=0)
            up = torch.cat([up[:, :b - 1].detach(), up[:, b - 1:]], dim=1)
        return a, up, scale

    @classmethod
    def training_hooks(cls, config: AdapterConfig, name: str, steps: int) -> list[Any]:
        from ..rank.dylora import DyLoraSampler

        assert isinstance(config, DyLoraConfig)
        return [DyLoraSampler(name, config.r_min)]
