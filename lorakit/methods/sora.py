"""SoRA (Ding et al., 2023; METHODS.md entry 27): LoRA with a gate per rank, ``ΔW x = s · B (g ⊙ A x)``, trained
with a proximal L1 step on ``g`` so ranks reach exact zeros and are pruned.

The parametrisation is :class:`~lorakit.methods.gated.GatedLora` with LoRA's init and ``g = 1`` (so with
``λ = 0`` it is plain LoRA); the gate step, sparsity schedule and pruning are :class:`lorakit.rank.sora.SoraHook`,
registered beside it as the method's training rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import require
from .base import register_method
from .gated import GatedLora, GatedLoraConfig


@dataclass(frozen=True)
class SoraConfig(GatedLoraConfig):
    """Config of a SoRA adapter.

    Attributes:
        sparse_lambda: ``λ`` of the L1 proximal step on the gates.
        lambda_max: sparsity schedule: ``λ`` rises linearly to this over ``lambda_steps`` (``None``: constant).
        lambda_steps: length of the schedule's ramp in optimizer steps.
        prune_every: remove zero-gated ranks (tensors and optimizer state) every this many steps (0: never during
            training; ranks are still pruned at the last step).
    """

    default_init: ClassVar[str] = "lora"

    sparse_lambda: float = 1e-3
    lambda_max: float | None = None
    lambda_steps: int = 0
    prune_every: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.sparse_lambda >= 0, "sparse_lambda", self.sparse_lambda, "must be >= 0")
        require(self.lambda_max is None or self.lambda_max >= self.sparse_lambda, "lambda_max", self.lambda_max,
                "must be >= sparse_lambda (the schedule only raises sparsity)")
        require(isinstance(self.lambda_steps, int) and self.lambda_steps >= 0, "lambda_steps", self.lambda_steps,
                "must be an integer >= 0")
        require(isinstance(self.prune_every, int) and self.prune_every >= 0, "prune_every", self.prune_every,
                "must be an integer >= 0")


@register_method("sora", SoraConfig)
class Sora(GatedLora):
    """SoRA: gated LoRA; its training hook applies the proximal gate step and prunes."""

