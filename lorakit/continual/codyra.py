"""CoDyRA: dynamic rank-selective LoRA for continual learning (Lu et al., 2024; METHODS.md entry 78).

Each task trains a fresh gated LoRA ``ΔW x = s · B (g ⊙ A x)`` whose per-rank importance ``g`` is made sparse by
proximal gradient descent,

    g ← sign(z) · max(|z| - σ / T, 0),    z = g - η ∇_g L / max |∇_g L|       (:class:`ProximalGates`)

over the task's ``T`` steps, so each layer keeps only the ranks relevant to the current data: a gate that no gradient
supports loses ``σ`` (``sparsity``) over the task and reaches zero when ``σ >= 1`` (its start); the zeroed ranks are
pruned (SoRA's pruning, :class:`lorakit.rank.sora.SoraHook`). The gates step by their gradient relative to the largest
gate gradient of the adapter (one scalar for all layers, so the relevance ordering between ranks and layers is kept
and the largest step is ``η`` whatever the loss's scale), not by AdamW's per-element normalised step: under AdamW
every gate moves by about the learning rate whatever its relevance, and the selection degenerates to all-or-nothing
(measured, see ``lorakit.rank.sora``); plain SGD on the raw gradient diverged on SmolLM2 (the gate gradients there are
orders of magnitude larger than on a tiny model). After the task
the adapter is merged into the weights (no inference overhead: the model keeps exactly its original architecture)
and layers whose every rank was pruned are skipped: their weights stay bit-identical.
The ranks each task kept are in :attr:`Codyra.ranks`.

Assumed where the abstract is silent: the importance is a SoRA-style gate (the paper's "sparse importance scalars
on rank units"); ``η`` (``gate_lr``) and the shrinkage per step are constant within a task.
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
    """Proximal gradient steps on the gates of adapter ``name`` (module docstring): the optimizer is kept off them
    (their gradient is taken and zeroed before its step; with no gradient ever, Adam never moves them)."""

    def __init__(self, name: str, gate_lr: float, sparsity: float, steps: int) -> None:
        require(gate_lr > 0, "gate_lr", gate_lr, "must be > 0")
        require(sparsity >= 0, "sparsity", sparsity, "must be >= 0")
        require(steps >= 1, "steps", steps, "must be >= 1")
        self.name, self.lr, self.shrink = name, gate_lr, sparsity / steps
        self._grads: dict[int, Tensor] = {}

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for _, adapter in gated_layers(model, self.name):
            gate = adapter.lora_E
            self._grads[id(gate)] = torch.zeros_like(gate) if gate.grad is None else gate.grad.clone()
            if gate.grad is not None:
                gate.grad.zero_()
        largest = max((float(g.abs().max()) for g in self._grads.values() if g.numel()), default=0.0)
        for key, grad in self._grads.items():
            self._grads[key] = grad / largest if largest > 0 else grad

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for _, adapter in gated_layers(model, self.name):
            gate = adapter.lora_E
            gate.copy_(soft_threshold(gate - self.lr * self._grads.pop(id(gate)), self.shrink))


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
                 sparsity: float = 1.0, gate_lr: float = 0.05) -> None:
        super().__init__(adapter, settings)
        ProximalGates("check", gate_lr, sparsity, settings.steps)  # validates them
        self.sparsity, self.gate_lr = sparsity, gate_lr
        self.ranks: list[dict[str, int]] = []

    def learn(self, model: nn.Module, index: int, scorer: ClassificationTask,
              examples: Sequence[Example]) -> list[float]:
        name = f"task{index}"
        config = SoraConfig(r=self.adapter.rank, alpha=self.adapter.alpha, targets=self.adapter.targets,
                            sparse_lambda=0.0)  # SoRA's hook only prunes; the gates follow ProximalGates
        params = fresh_adapter(model, config, name)
        hooks = [ProximalGates(name, self.gate_lr, self.sparsity, self.settings.steps),
                 *training_hooks(configs(model)[name], name, self.settings.steps)]
        losses = fit(model, scorer, examples, params, self.settings, hooks)
        self.ranks.append(merge_nonzero(model, name))
        return losses

    def finish(self, model: nn.Module) -> nn.Module:
        return model  # every task is merged already


LEARNERS.register("codyra", Codyra)
