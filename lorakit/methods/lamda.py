"""LaMDA / LaMDA++ (Azizi et al., 2024; METHODS.md entry 14): spectrally initialised ``B S A`` with frozen ``A``.

    h = W0 x + s * B S A x,     A: (r, d_in) frozen,  S: (r, r) trained,  B: (d_out, r) trained, then frozen

with ``s = alpha / r``.

``A = V_r^T`` and ``B = U_r Sigma_r`` come from the top-``r`` SVD of ``W0`` and ``S = 0``, so training starts at the
base model (LoRA-XS's ``"svd"`` layout, whose three-factor forward this reuses: ``B (S (A x))``, never ``dW``).
Because ``A`` is frozen, backward keeps only the ``r``-dim activations ``A x`` and ``S A x``, not ``x``.
``B`` trains during the first ``freeze_b_step`` steps; :func:`lamda_freeze` (call it every step) then freezes it
(``requires_grad=False``, dropped from the optimizer with its state), leaving ``r^2`` trained numbers per layer.

LaMDA++ (``energy`` set): each layer's rank is the smallest ``r_l <= r`` whose top singular values hold ``energy``
of ``||W0||_F^2`` (the normalised spectrum energy), a one-off, data-free per-layer allocation.

Assumed (METHODS.md says verify): "gradually frozen" is read as ``B`` trained for a fixed number of early steps
then frozen whole (freezing part of a tensor cannot free its optimizer state); LaMDA++'s allocation is the
per-layer energy threshold above, capped by ``r``; ``B`` carries ``Sigma_r`` (LoRA-XS's split of the SVD).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import LorakitError, require
from ..hooks import TrainingHook, training_rule
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from ..hosts.host import adapters_named
from ..init.layout import base_matrix
from .base import register_method
from .lora_xs import LoraXs, LoraXsConfig


@dataclass(frozen=True)
class LamdaConfig(LoraXsConfig):
    """Config of a LaMDA adapter (``init`` as LoRA-XS: ``"svd"`` or a registered three-factor initialiser).

    Attributes:
        freeze_b_step: the training step from which ``B`` is frozen (see :func:`lamda_freeze`).
        energy: LaMDA++: per-layer rank from the normalised singular-value energy of ``W0``, in ``(0, 1]``;
            ``None`` (LaMDA): rank ``r`` everywhere.
    """

    builtin_inits: ClassVar[tuple[str, ...]] = ("svd",)

    freeze_b_step: int = 100
    energy: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.freeze_b_step, int) and self.freeze_b_step >= 0, "freeze_b_step",
                self.freeze_b_step, "must be a non-negative integer")
        require(self.energy is None or (isinstance(self.energy, (int, float)) and 0 < self.energy <= 1),
                "energy", self.energy, "must be None or in (0, 1]")


def energy_rank(weight: torch.Tensor, energy: float, cap: int) -> int:
    """Smallest ``k <= cap`` whose top-``k`` singular values of ``weight`` hold ``energy`` of the squared spectrum."""
    power = torch.linalg.svdvals(weight.detach().float()).pow(2)
    share = power.cumsum(0) / power.sum()
    return min(cap, int((share < energy - 1e-6).sum()) + 1)


@register_method("lamda", LamdaConfig)
class Lamda(LoraXs):
    """``delta(x) = s * B S A x`` with ``A`` frozen from the start and ``B`` frozen by :func:`lamda_freeze`."""

    trained = ("lora_R", "lora_B")

    def __init__(self, geometry: Geometry, config: LamdaConfig, base: Backend) -> None:
        if config.energy is not None:
            config = config.replace(r=energy_rank(base_matrix(geometry, base), config.energy, config.r))
        super().__init__(geometry, config, base)

    @property
    def b_frozen(self) -> bool:
        return "lora_B" not in self.trained

    def freeze_b(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Stop training ``B``: no gradient, out of ``optimizer``'s parameter groups, its state freed."""
        self.trained = ("lora_R",)
        b = self.lora_B
        b.requires_grad_(False)
        b.grad = None
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p is not b]
            optimizer.state.pop(b, None)


def lamda_freeze(model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None,
                 name: str = "default") -> int:
    """Freeze ``B`` of every layer of LaMDA adapter ``name`` whose ``freeze_b_step`` is reached at ``step``; returns
    how many it froze."""
    frozen = 0
    for _, module in adapters_named(model, name, Lamda):
        if not module.b_frozen and step >= module.config.freeze_b_step:
            module.freeze_b(optimizer)
            frozen += 1
    return frozen


class LamdaFreeze(TrainingHook):
    """Freezes adapter ``name``'s ``B`` once its ``freeze_b_step`` is reached. Resuming from a checkpoint taken after
    that is refused (the checkpoint's optimizer no longer holds ``B``)."""

    def __init__(self, name: str) -> None:
        self.name, self.frozen = name, 0

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.frozen += lamda_freeze(model, step, optimizer, self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        if state["frozen"]:
            raise LorakitError("this LaMDA run froze B before its checkpoint; resuming after the freeze is not "
                               "supported: resume from an earlier checkpoint or start again")


@training_rule("lamda")
def _rules(config: AdapterConfig, name: str, steps: int) -> list[TrainingHook]:
    assert isinstance(config, LamdaConfig)
    return [LamdaFreeze(name)]
