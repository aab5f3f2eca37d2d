"""SoRA (Ding et al., 2023; METHODS.md entry 27): a gate ``g`` per rank, driven to exact zeros by a proximal L1 step,
and pruning of the zeroed ranks.

    z = g - η ∇_g L                 (the trainer's optimizer step on g; SoRA's code uses AdamW for it too)
    g ← sign(z) · max(|z| - η λ_t, 0)   (this hook, right after the step; η is g's current learning rate)

The sparsifying schedule raises ``λ_t`` linearly from ``sparse_lambda`` to ``lambda_max`` over ``lambda_steps``
steps (monotone; the paper's scheduler studies exactly this sweep). Every ``prune_every`` steps (and by
:meth:`SoraHook.prune`) ranks whose gate is exactly zero are removed from ``A``, ``B`` and ``g`` *and* from the
optimizer's moments. Zero gates contribute nothing, so pruning never changes the function. Pruning keeps ``g``
(unlike the paper's final step, which folds it into ``B``) so training can continue; the folded compact LoRA is
what :func:`lorakit.export_lora` writes for PEFT.

Measured on short runs (``benchmarks/rank.py``): a gate starting at 1 reaches zero only once ``λ Σ_t η_t >= 1``,
while AdamW moves it at most ``Σ_t η_t`` by its gradient, so in a few dozen steps every gate shrinks alike and the
choice is all-or-nothing; SoRA's selection needs runs where ``Σ_t η_t`` is large (the paper trains for epochs).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import require
from ..hooks import TrainingHook, training_rule
from ..methods.sora import SoraConfig
from .ops import RankHook, gated_layers, lr_of, ranks_of, resize_ranks


def soft_threshold(z: Tensor, t: float) -> Tensor:
    """The proximal operator of ``t ||·||_1``: ``sign(z) max(|z| - t, 0)`` (exact zeros below ``t``)."""
    return torch.sign(z) * torch.clamp(z.abs() - t, min=0.0)


class SoraHook(RankHook):
    """Proximal gate step after every optimizer step, sparsity schedule, and pruning of zeroed ranks."""

    def __init__(self, name: str = "default", sparse_lambda: float = 1e-3, lambda_max: float | None = None,
                 lambda_steps: int = 0, prune_every: int = 0) -> None:
        require(sparse_lambda >= 0, "sparse_lambda", sparse_lambda, "must be >= 0")
        require(lambda_max is None or lambda_max >= sparse_lambda, "lambda_max", lambda_max,
                f"must be >= sparse_lambda ({sparse_lambda}): the schedule only raises sparsity")
        require(lambda_steps >= 0 and prune_every >= 0, "lambda_steps/prune_every", (lambda_steps, prune_every),
                "must be >= 0")
        super().__init__(name)
        self.lam0, self.prune_every = sparse_lambda, prune_every
        self.lam_max = sparse_lambda if lambda_max is None else lambda_max
        self.lambda_steps = lambda_steps

    def lam(self, step: int) -> float:
        """``λ_t``: linear from ``sparse_lambda`` to ``lambda_max`` over ``lambda_steps`` steps, then constant."""
        frac = 1.0 if self.lambda_steps == 0 else min(1.0, step / self.lambda_steps)
        return self.lam0 + (self.lam_max - self.lam0) * frac

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self._eta = {id(a.lora_E): lr_of(optimizer, a.lora_E) for _, a in gated_layers(model, self.name)}

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """The proximal step with the learning rate the optimizer step just used (read before the scheduler moved)."""
        lam = self.lam(step)
        for _, adapter in gated_layers(model, self.name):
            gate = adapter.lora_E
            gate.copy_(soft_threshold(gate, self._eta[id(gate)] * lam))
        if self.prune_every and step % self.prune_every == 0:
            self.prune(model, optimizer)

    @torch.no_grad()
    def prune(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Remove every rank whose gate is exactly zero (with its optimizer moments); returns the new ranks."""
        for host, adapter in list(gated_layers(model, self.name)):
            keep = torch.nonzero(adapter.lora_E).flatten()
            if keep.numel() < adapter.r:
                resize_ranks(model, self.name, host, keep, optimizer=optimizer)
        return ranks_of(model, self.name)


@training_rule("sora")
def _rules(config: AdapterConfig, name: str, steps: int) -> list[TrainingHook]:
    assert isinstance(config, SoraConfig)
    return [SoraHook(name, config.sparse_lambda, config.lambda_max, config.lambda_steps, config.prune_every or steps)]
