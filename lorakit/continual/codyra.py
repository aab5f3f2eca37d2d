"""CoDyRA: dynamic rank-selective LoRA for continual learning (Lu et al., 2024; METHODS.md entry 78).

Each task trains a fresh gated LoRA ``ΔW x = s · B (g ⊙ A x)`` whose per-rank importance ``g`` is made sparse by
proximal gradient descent,

    g ← sign(z) · max(|z| - η λ, 0),    z = g - η ∇_g L          (:class:`ProximalGates`; plain SGD on ``g``)

so each layer keeps only the ranks relevant to the current data (a rank whose gate gradient is small drifts to
zero); the zeroed ranks are pruned (SoRA's pruning, :class:`lorakit.rank.sora.SoraHook`). The gates step by their
plain gradient, not AdamW's normalised one: under AdamW every gate moves by about the learning rate whatever its
relevance, and the selection degenerates to all-or-nothing (measured, see ``lorakit.rank.sora``). After the task
the adapter is merged into the weights (no inference overhead: the model keeps exactly its original architecture)
and layers whose every rank was pruned are skipped: their weights stay bit-identical.
The ranks each task kept are in :attr:`Codyra.ranks`.

Assumed where the abstract is silent: the importance is a SoRA-style gate (the paper's "sparse importance scalars
on rank units"); ``η`` (``gate_lr``) and ``λ`` are constant within a task.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import require
from ..hooks import TrainingHook, training_hooks
from ..hosts.host import hosts
from ..inject import configs, unload
from ..methods.sora import SoraConfig
from ..rank.ops import gated_layers
from ..rank.sora import soft_threshold
from ..train.tasks import ClassificationTask, Example
from .learners import DEFAULT_ADAPTER, LEARNERS, AdapterSettings, Learner, fresh_adapter
from .loop import DEFAULT_FIT, FitSettings, fit


class ProximalGates(TrainingHook):
    """Proximal SGD on the gates of adapter ``name`` (module docstring): the optimizer is kept off them (their
    gradient is taken and zeroed before its step; with no gradient ever, Adam never moves them)."""

    def __init__(self, name: str, gate_lr: float, sparse_lambda: float) -> None:
        require(gate_lr > 0, "gate_lr", gate_lr, "must be > 0")
        require(sparse_lambda >= 0, "sparse_lambda", sparse_lambda, "must be >= 0")
        self.name, self.lr, self.lam = name, gate_lr, sparse_lambda
        self._grads: dict[int, Tensor] = {}

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for _, adapter in gated_layers(model, self.name):
            gate = adapter.lora_E
            self._grads[id(gate)] = torch.zeros_like(gate) if gate.grad is None else gate.grad.clone()
            if gate.grad is not None:
                gate.grad.zero_()

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for _, adapter in gated_layers(model, self.name):
            gate = adapter.lora_E
            gate.copy_(soft_threshold(gate - self.lr * self._grads.pop(id(gate)), self.lr * self.lam))


def merge_nonzero(model: nn.Module, name: str) -> dict[str, int]:
    """Merge gated adapter ``name`` into the weights, skipping layers whose rank is 0, and remove every host layer;
    returns the merged layers' ranks."""
    ranks = {host.path: adapter.r for host, adapter in gated_layers(model, name)}
    for host in list(hosts(model)):
        if name in host.adapters and ranks[host.path] == 0:
            host.remove(name)
    unload(model, merge_active=True)
    return {path: r for path, r in ranks.items() if r > 0}


class Codyra(Learner):
    """CoDyRA (module docstring): a SoRA-gated LoRA per task, pruned and merged after it."""

    name = "codyra"

    def __init__(self, adapter: AdapterSettings = DEFAULT_ADAPTER, settings: FitSettings = DEFAULT_FIT,
                 sparse_lambda: float = 0.1, gate_lr: float = 0.5) -> None:
        super().__init__(adapter, settings)
        ProximalGates("check", gate_lr, sparse_lambda)  # validates both
        self.sparse_lambda, self.gate_lr = sparse_lambda, gate_lr
        self.ranks: list[dict[str, int]] = []

    def learn(self, model: nn.Module, index: int, scorer: ClassificationTask,
              examples: Sequence[Example]) -> list[float]:
        name = f"task{index}"
        config = SoraConfig(r=self.adapter.rank, alpha=self.adapter.alpha, targets=self.adapter.targets,
                            sparse_lambda=0.0)  # SoRA's hook only prunes; the gates follow ProximalGates
        params = fresh_adapter(model, config, name)
        hooks = [ProximalGates(name, self.gate_lr, self.sparse_lambda),
                 *training_hooks(configs(model)[name], name, self.settings.steps)]
        losses = fit(model, scorer, examples, params, self.settings, hooks)
        self.ranks.append(merge_nonzero(model, name))
        return losses

    def finish(self, model: nn.Module) -> nn.Module:
        return model  # every task is merged already


LEARNERS.register("codyra", Codyra)
