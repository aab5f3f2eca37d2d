"""IncreLoRA (Zhang et al., 2023; METHODS.md entry 29): start with small ranks and add rank components to the most
important layers during training, within a total budget, on the gated ``P Λ Q`` adapter.

Every ``grow_every`` steps the ``grow_layers`` layers with the highest mean triplet importance (AdaLoRA's smoothed
sensitivity, :mod:`lorakit.rank.importance`) each get one new rank, as long as the total rank stays within
``budget``. A new component starts with ``λ = 0`` and ``P, Q ~ N(0, 0.02²)`` (AdaLoRA's init), so the output does
not change at the step it is added; its optimizer moments start at zero while every old moment is kept. Assumed
where the paper is vague: one rank per chosen layer per growth step, and no "advance learning" warm-up of the new
components (they are trained from the next step on like the others). The AdaLoRA orthogonality regulariser applies.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import require
from ..hooks import TrainingHook, training_rule
from ..methods.adalora import IncreLoraConfig
from .importance import ImportanceHook
from .ops import gated_layers, resize_ranks, total_rank


class IncreLoraHook(ImportanceHook):
    """Importance-driven rank growth within ``budget`` (the total rank over all layers; ``per_layer``: per layer
    on average)."""

    def __init__(self, name: str = "default", *, budget: int, per_layer: bool = False, grow_every: int = 10,
                 grow_layers: int = 1, beta1: float = 0.85, beta2: float = 0.85, orth_reg: float = 0.5) -> None:
        require(budget >= 1, "budget", budget, "must be >= 1 (total rank over all layers)")
        require(grow_every >= 1, "grow_every", grow_every, "must be >= 1")
        require(grow_layers >= 1, "grow_layers", grow_layers, "must be >= 1")
        require(orth_reg >= 0, "orth_reg", orth_reg, "must be >= 0")
        super().__init__(name, beta1, beta2, orth_reg)
        self.budget_given, self.per_layer, self.budget = budget, per_layer, budget
        self.grow_every, self.grow_layers = grow_every, grow_layers

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().on_train_begin(model, optimizer)
        layers = len(list(gated_layers(model, self.name)))
        self.budget = self.budget_given * layers if self.per_layer else self.budget_given
        start = total_rank(model, self.name)
        require(start <= self.budget, "budget", self.budget, f"must be at least the starting total rank {start}")

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if step % self.grow_every == 0:
            self.grow(model, optimizer)

    @torch.no_grad()
    def grow(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
        """Add one rank to each of the top-scoring layers that the budget allows; returns their paths."""
        room = self.budget - total_rank(model, self.name)
        layers = list(gated_layers(model, self.name))
        if room <= 0 or not layers:
            return []
        zero = torch.zeros(())
        score = torch.stack([self.importance.scores(h.path, a).mean().cpu() if a.r else zero
                             for h, a in layers])
        chosen = torch.topk(score, min(self.grow_layers, room, len(layers))).indices.tolist()
        for i in chosen:
            host, adapter = layers[i]
            keep = torch.arange(adapter.r)
            resize_ranks(model, self.name, host, keep, extra=1, optimizer=optimizer)
            self.importance.resize(host.path, keep, 1)
        return [layers[i][0].path for i in chosen]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "importance": self.importance.state_dict()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        super().load_state_dict(state, model)
        self.importance.load_state_dict(state["importance"])


@training_rule("increlora")
def _rules(config: AdapterConfig, name: str, steps: int) -> list[TrainingHook]:
    assert isinstance(config, IncreLoraConfig)
    return [IncreLoraHook(name, budget=config.target_r, per_layer=True, grow_every=config.grow_every,
                          grow_layers=config.grow_layers, beta1=config.beta1, beta2=config.beta2,
                          orth_reg=config.orth_reg)]
