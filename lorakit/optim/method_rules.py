"""Training hooks for the training-time rules of catalogue methods, handed to trainers by each method's
:meth:`~lorakit.methods.base.Adapter.training_hooks` (methods do not import the training package).

* :class:`S2LoraProx` — S2-LoRA's L1 proximal step on the per-layer coefficients ``lambda`` after every optimizer
  step, with the learning rate that step used: ``lambda <- sign(lambda) max(|lambda| - lr * l1, 0)``.
* :class:`LamdaFreeze` — LaMDA's gradual freezing: ``B`` stops training (and its optimizer state is freed) once
  ``freeze_b_step`` steps are done. Resuming from a checkpoint taken after that is refused (the checkpoint's
  optimizer no longer holds ``B``).
* :class:`MosaResample` — MoSA's sparse training: ``k`` of the adapter's modules are sampled before every step
  (seeded; the sampler's state is checkpointed); after the last step every module is active again.
* :class:`SaraNuclear` — SaRA's nuclear-norm regulariser ``weight * sum_l ||dW_l||_*`` added to the loss.

Each rule acts on every adapter of its method in the model (the functions in the method files).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..methods.lamda import lamda_freeze
from ..methods.mosa import mosa_resample
from ..methods.s2lora import s2lora_prox
from ..methods.sara import sara_nuclear_norm
from ..train.hooks import TrainingHook


class S2LoraProx(TrainingHook):
    """Soft-thresholds S2-LoRA's ``lambda`` by ``lr * l1`` after each step (``lr``: the rate that step used)."""

    def __init__(self, l1: float) -> None:
        require(l1 >= 0, "l1", l1, "must be >= 0")
        self.l1, self._lr = l1, 0.0

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self._lr = float(optimizer.param_groups[0]["lr"])

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        s2lora_prox(model, self._lr * self.l1)


class LamdaFreeze(TrainingHook):
    """Freezes LaMDA's ``B`` once its ``freeze_b_step`` is reached."""

    def __init__(self) -> None:
        self.frozen = 0

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.frozen += lamda_freeze(model, step, optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        if state["frozen"]:
            raise LorakitError("this LaMDA run froze B before its checkpoint; resuming after the freeze is not "
                               "supported: resume from an earlier checkpoint or start again")


class MosaResample(TrainingHook):
    """Samples ``k`` MoSA modules per layer before each step; the complete adapter after the last one."""

    def __init__(self, k: int, steps: int, seed: int = 0) -> None:
        require(isinstance(k, int) and k >= 1, "k", k, "must be a positive integer")
        self.k, self.steps = k, steps
        self.generator = torch.Generator().manual_seed(seed)

    def before_forward(self, model: nn.Module, step: int) -> None:
        mosa_resample(model, self.k, self.generator)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if step >= self.steps:
            mosa_resample(model, None)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self.generator.set_state(state["generator"])


class SaraNuclear(TrainingHook):
    """Adds ``weight * sum of the nuclear norms of SaRA's updates`` to each step's loss."""

    def __init__(self, weight: float) -> None:
        require(weight > 0, "weight", weight, "must be > 0")
        self.weight = weight

    def regulariser(self, model: nn.Module) -> Tensor:
        return self.weight * sara_nuclear_norm(model)
