"""LoRA-GGPO (Chang et al., 2025; METHODS.md entry 18): gradient-guided weight perturbation against double descent.

Before each step's forward pass every trained tensor ``θ`` of the adapter gets a random perturbation whose size per
row follows the row's last gradient and weight norms; the gradients are computed at the perturbed point and the
step is applied to the *restored* weights (SAM-like, but with no extra forward or backward pass)::

    ε_row ~ N(0, σ_row² I),   σ_row = (α ||∇θ_row|| + β ||θ_row||) / sqrt(n_row)      (so E||ε_row||² = σ_row² n_row)

Assumed where METHODS.md recalls the paper only loosely: the perturbation is applied to the adapter's factors (a
row is a slice along the first axis), not to the merged weight ``W0 + BA`` (whose gradient LoRA never forms), and
``∇θ`` is the previous step's gradient (zero before the first step, so step 0 is perturbed by ``β`` alone). The
restore copies the saved tensors back, bit for bit, before the optimizer step.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import require
from ..hooks import TrainingHook
from ..inject import trainable_parameters


def _row_norms(t: Tensor) -> Tensor:  # (rows, 1...) broadcastable against t
    rows = t.detach().float().reshape(t.shape[0], -1) if t.ndim > 1 else t.detach().float().reshape(1, -1)
    norms = rows.norm(dim=1)
    return norms.reshape(-1, *([1] * (t.ndim - 1))) if t.ndim > 1 else norms.reshape(())


class GgpoHook(TrainingHook):
    """Perturb in :meth:`before_forward`, restore in :meth:`before_step` (after the gradients are computed)."""

    def __init__(self, name: str = "default", alpha: float = 0.05, beta: float = 0.01, seed: int = 0) -> None:
        require(alpha >= 0 and beta >= 0, "alpha/beta", (alpha, beta), "must be >= 0")
        self.name, self.alpha, self.beta = name, alpha, beta
        self.generator = torch.Generator().manual_seed(seed)
        self.grad_norms: dict[str, Tensor] = {}
        self._saved: dict[str, Tensor] = {}

    @torch.no_grad()
    def before_forward(self, model: nn.Module, step: int) -> None:
        self._saved = {}
        for key, p in trainable_parameters(model, self.name).items():
            n_row = p[0].numel() if p.ndim > 1 else p.numel()
            grad = self.grad_norms.get(key)
            if grad is None or grad.shape[:1] != _row_norms(p).shape[:1]:  # no gradient yet, or ranks resized
                grad = torch.zeros(())
            sigma = (self.alpha * grad.to(p.device) + self.beta * _row_norms(p)) / n_row ** 0.5
            noise = torch.randn(p.shape, generator=self.generator).to(device=p.device, dtype=torch.float32)
            self._saved[key] = p.detach().clone()
            p.add_((noise * sigma).to(p.dtype))

    @torch.no_grad()
    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        params = trainable_parameters(model, self.name)
        for key, saved in self._saved.items():
            p = params[key]
            if p.grad is not None:
                self.grad_norms[key] = _row_norms(p.grad)
            p.copy_(saved)
        self._saved = {}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "grad_norms": dict(self.grad_norms)}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        if state:
            self.generator.set_state(state["generator"])
            self.grad_norms = dict(state["grad_norms"])
