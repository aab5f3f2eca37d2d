"""DyLoRA (Valipour et al., 2023; METHODS.md entry 28): one LoRA trained for every rank ``b`` in ``[r_min, r]``.

    h = W0 x + (alpha / b) · B[:, :b] A[:b, :] x          (rsLoRA: alpha / sqrt(b))

Training samples ``b`` each step (:class:`DyLoraSampler`, the method's registered training rule) and runs the
truncated forward, so the first ranks learn what matters most (nested dropout).
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
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import LorakitError, require
from ..hooks import TrainingHook, training_rule
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from ..hosts.host import adapters_named
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

    def __init__(self, geometry: Geometry, config: DyLoraConfig, base: Backend) -> None:
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



def dylora_layers(model: nn.Module, name: str) -> list[DyLora]:
    """The layers of DyLoRA adapter ``name``; an error when it has none."""
    layers = [adapter for _, adapter in adapters_named(model, name, DyLora)]
    if not layers:
        raise LorakitError(f"the model has no DyLoRA adapter named {name!r}")
    return layers


def set_rank(model: nn.Module, name: str, b: int | None) -> None:
    """Every layer of adapter ``name`` computes with its first ``b`` ranks (``None``: all of them)."""
    for adapter in dylora_layers(model, name):
        adapter.set_rank(b)


class DyLoraSampler(TrainingHook):
    """Draws the step's rank ``b ~ U{r_min, ..., r}`` (the paper's uniform ``p_B``) from its own seeded generator
    before the forward pass and sets it on every layer of adapter ``name`` (clamped to a layer's rank when
    ``rank_pattern`` gives layers different ranks); restores the full rank after the step."""

    def __init__(self, name: str = "default", r_min: int = 1, seed: int = 0) -> None:
        require(r_min >= 1, "r_min", r_min, "must be >= 1")
        self.name, self.r_min = name, r_min
        self.generator = torch.Generator().manual_seed(seed)
        self.last: int | None = None

    def before_forward(self, model: nn.Module, step: int) -> None:
        r = max(a.a.shape[0] for a in dylora_layers(model, self.name))
        self.last = int(torch.randint(self.r_min, r + 1, (), generator=self.generator))
        set_rank(model, self.name, self.last)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        set_rank(model, self.name, None)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])


@training_rule("dylora")
def _rules(config: AdapterConfig, name: str, steps: int) -> list[TrainingHook]:
    assert isinstance(config, DyLoraConfig)
    return [DyLoraSampler(name, config.r_min)]
