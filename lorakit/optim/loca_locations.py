"""LoCA's location learning (METHODS.md entry 5) as a training hook: alternate coefficient and location updates.

On every ``every``-th optimizer step before ``until``, each LoCA adapter named ``name`` probes the DCT spectrum's
gradient around its coefficients during that step's forward/backward passes (:meth:`Loca.start_probe`), and right
before the optimizer step moves each coefficient to the neighbouring frequency with the steepest first-order loss
decrease (:meth:`Loca.relocate`). Coefficient values keep training on every step; locations are frozen after
``until``. The locations live in the adapter (saved with it), so the hook keeps no state.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import require
from ..inject import hosts
from ..methods.loca import Loca
from ..train.hooks import TrainingHook


def loca_layers(model: nn.Module, name: str) -> list[Loca]:
    found = (h.adapters[name] for h in hosts(model) if name in h.adapters)
    return [a for a in found if isinstance(a, Loca)]


class LocaLocations(TrainingHook):
    """Probe on steps ``0, every, 2 every, ... < until``; relocate before those steps' optimizer update."""

    def __init__(self, name: str = "default", every: int = 10, until: int | None = None) -> None:
        require(isinstance(every, int) and every >= 1, "every", every, "must be a positive integer")
        self.name, self.every, self.until = name, every, until
        self.moved = 0  # coefficients moved so far (for logging and tests)

    def before_forward(self, model: nn.Module, step: int) -> None:
        if step % self.every == 0 and (self.until is None or step < self.until):
            for adapter in loca_layers(model, self.name):
                adapter.start_probe()

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for adapter in loca_layers(model, self.name):
            if adapter.probing:
                self.moved += adapter.relocate()
