"""AdaLoRA's sensitivity-based importance (Zhang et al., 2023, eqs. 8-11), shared by AdaLoRA and IncreLoRA.

    I(w) = |w ⊙ ∇w|,   Ī ← β1 Ī + (1-β1) I,   Ū ← β2 Ū + (1-β2) |I - Ī|,   s(w) = Ī ⊙ Ū

and the score of rank ``i`` of a layer (the triplet ``P_{:,i}, λ_i, Q_{i,:}``) is
``S_i = s(λ_i) + mean_j s(P_{j,i}) + mean_j s(Q_{i,j})`` (PEFT's ``_element_score``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import require
from ..methods.gated import GatedLora
from .ops import RankHook, gated_layers


class Sensitivity:
    """Smoothed sensitivity of every tensor of a gated adapter, keyed by ``(layer path, tensor name)``."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85) -> None:
        require(0 <= beta1 < 1 and 0 <= beta2 < 1, "beta1/beta2", (beta1, beta2), "must be in [0, 1)")
        self.beta1, self.beta2 = beta1, beta2
        self.ema: dict[str, tuple[Tensor, Tensor]] = {}  # "path|tensor" -> (Ī, Ū)

    @torch.no_grad()
    def update(self, path: str, adapter: GatedLora) -> None:
        """Fold the current gradients into the averages (call while gradients are present)."""
        for name in GatedLora.RANK_DIMS:
            p: nn.Parameter = getattr(adapter, name)
            if p.grad is None:
                continue
            now = (p * p.grad).abs().float()
            ibar, ubar = self.ema.get(f"{path}|{name}", (torch.zeros_like(now), torch.zeros_like(now)))
            ibar = self.beta1 * ibar + (1 - self.beta1) * now
            ubar = self.beta2 * ubar + (1 - self.beta2) * (now - ibar).abs()
            self.ema[f"{path}|{name}"] = (ibar, ubar)

    def scores(self, path: str, adapter: GatedLora) -> Tensor:
        """``S_i`` for each rank of the layer (zeros before any update), shape ``(r,)``."""
        total = torch.zeros(adapter.r, device=adapter.lora_E.device)
        for name, dim in GatedLora.RANK_DIMS.items():
            if f"{path}|{name}" in self.ema:
                ibar, ubar = self.ema[f"{path}|{name}"]
                s = (ibar * ubar).movedim(dim, 0).reshape(adapter.r, -1)
                total += s.mean(dim=1)
        return total

    def resize(self, path: str, keep: Tensor, extra: int) -> None:
        """Follow a rank resize of layer ``path``: keep rows ``keep`` and append ``extra`` zero rows."""
        for name, dim in GatedLora.RANK_DIMS.items():
            key = f"{path}|{name}"
            if key in self.ema:
                self.ema[key] = tuple(_resize(t, keep, extra, dim) for t in self.ema[key])  # type: ignore[assignment]

    def state_dict(self) -> dict[str, Any]:
        return {key: list(pair) for key, pair in self.ema.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = {key: (pair[0], pair[1]) for key, pair in state.items()}


def _resize(t: Tensor, keep: Tensor, extra: int, dim: int) -> Tensor:
    kept = t.index_select(dim, keep.to(t.device))
    shape = list(kept.shape)
    shape[dim] = extra
    return torch.cat([kept, kept.new_zeros(shape)], dim=dim)


def orthogonality(model: nn.Module, name: str) -> Tensor | None:
    """AdaLoRA's regulariser ``mean over matrices of ||P^T P - I||_F and ||Q Q^T - I||_F`` (PEFT's form)."""
    terms = []
    for _, adapter in gated_layers(model, name):
        if adapter.r == 0:
            continue
        q = adapter.lora_A.reshape(adapter.r, -1)  # (r, d_in)
        p = adapter.lora_B.reshape(adapter.lora_B.shape[0], adapter.r)  # (d_out, r)
        eye = torch.eye(adapter.r, device=q.device, dtype=q.dtype)
        terms += [torch.linalg.matrix_norm(q @ q.t() - eye), torch.linalg.matrix_norm(p.t() @ p - eye)]
    return torch.stack(terms).mean() if terms else None


class ImportanceHook(RankHook):
    """Base of AdaLoRA's and IncreLoRA's hooks: the smoothed sensitivity of every triplet, updated from each step's
    gradients before the optimizer step, and the orthogonality regulariser ``orth_reg * R(P, Q)`` on the loss."""

    def __init__(self, name: str, beta1: float, beta2: float, orth_reg: float) -> None:
        super().__init__(name)
        self.orth_reg = orth_reg
        self.importance = Sensitivity(beta1, beta2)

    def regulariser(self, model: nn.Module) -> Tensor | None:
        term = orthogonality(model, self.name)
        return None if term is None or self.orth_reg == 0 else self.orth_reg * term

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for host, adapter in gated_layers(model, self.name):
            self.importance.update(host.path, adapter)
