"""AdaLoRA (Zhang et al., 2023) and IncreLoRA (Zhang et al., 2023; METHODS.md entry 29): the SVD-form update
``ΔW = s · P Λ Q`` whose total rank is pruned to a budget (AdaLoRA) or grown up to one (IncreLoRA).

Both use :class:`~lorakit.methods.gated.GatedLora` (``P = lora_B``, ``Λ = lora_E``, ``Q = lora_A``) with PEFT
AdaLoRA's init (``Λ = 0``, ``P, Q ~ N(0, 0.02²)``: identity at init); the schedules, importance scores and the
orthogonality regulariser are :mod:`lorakit.rank.adalora` / :mod:`lorakit.rank.increlora`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import require
from .base import register_method
from .gated import GatedLora, GatedLoraConfig


@dataclass(frozen=True)
class _SvdFormConfig(GatedLoraConfig):
    """Fields both share: importance smoothing ``beta1``/``beta2`` and the orthogonality weight ``orth_reg``."""

    default_init: ClassVar[str] = "svd"

    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, name, getattr(self, name), "must be in [0, 1)")
        require(self.orth_reg >= 0, "orth_reg", self.orth_reg, "must be >= 0")


@dataclass(frozen=True)
class AdaLoraConfig(_SvdFormConfig):
    """Config of an AdaLoRA adapter: every layer starts at ``r``; the total rank is pruned to ``target_r`` per
    layer on average (``target_r * layers`` in all) following the cubic schedule with ``t_init`` / ``t_final``
    given as fractions of the training steps, re-allocated every ``delta_t`` steps."""

    target_r: int = 4
    t_init: float = 0.1
    t_final: float = 0.2
    delta_t: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.target_r, int) and 0 <= self.target_r <= self.r, "target_r", self.target_r,
                f"must be an integer in [0, r={self.r}]")
        require(0 <= self.t_init and 0 <= self.t_final and self.t_init + self.t_final < 1, "t_init/t_final",
                (self.t_init, self.t_final), "must be fractions >= 0 summing to less than 1")
        require(isinstance(self.delta_t, int) and self.delta_t >= 1, "delta_t", self.delta_t, "must be >= 1")


@dataclass(frozen=True)
class IncreLoraConfig(_SvdFormConfig):
    """Config of an IncreLoRA adapter: every layer starts at ``r``; ranks grow (one per chosen layer, the
    ``grow_layers`` most important, every ``grow_every`` steps after the first ``init_warmup`` steps) up to
    ``target_r`` per layer on average. ``advance_learning`` (the authors' ``advance_learn``, on by default as in
    their code) keeps one reserve component per layer whose factors train in advance at ``λ = 1e-5``
    (:mod:`lorakit.rank.increlora`)."""

    r: int = 2
    target_r: int = 8
    grow_every: int = 10
    grow_layers: int = 1
    init_warmup: int = 0
    advance_learning: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.target_r, int) and self.target_r >= self.r, "target_r", self.target_r,
                f"must be an integer >= r={self.r}")
        for name in ("grow_every", "grow_layers"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, getattr(self, name),
                    "must be an integer >= 1")
        require(isinstance(self.init_warmup, int) and not isinstance(self.init_warmup, bool) and self.init_warmup >= 0,
                "init_warmup", self.init_warmup, "must be an integer >= 0 (steps before the first growth)")
        require(isinstance(self.advance_learning, bool), "advance_learning", self.advance_learning,
                "must be true or false")


@register_method("adalora", AdaLoraConfig)
class AdaLora(GatedLora):
    """AdaLoRA: ``P Λ Q`` with importance-based masking of ``Λ`` to a scheduled budget."""



@register_method("increlora", IncreLoraConfig)
class IncreLora(GatedLora):
    """IncreLoRA: ``P Λ Q`` whose most important layers gain ranks during training, within a budget."""

