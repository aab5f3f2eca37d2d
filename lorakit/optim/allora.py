"""ALLoRA (Huang et al., 2024; METHODS.md entry 17): an adaptive learning rate per parameter row, inversely
proportional to the row's norm and bounded by ``eta``:

    c_row = 1 / sqrt(||θ_row||² + 1/η²)          θ_row ← θ_row + c_row · Δ_row

where ``Δ`` is AdamW's update. A row at zero (``B`` at init) moves ``η`` times AdamW's step; large rows move less.
Assumed where METHODS.md recalls the paper only loosely: the coefficient scales the optimizer's *update* of each
row (a per-row learning rate, computed from the weights before the step) rather than per-sample gradients, since
Adam's normalisation would cancel a gradient scale; a row is a slice along the first axis (a rank of ``A``, an
output unit of ``B``); a 1-D tensor is one row. ALLoRA also drops dropout and the ``alpha / r`` scaling: use it with
``dropout=0`` and ``alpha = r``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import require
from .loraplus import ADAM_OPTIONS, check_options
from .registry import OPTIMIZERS


def row_coefficient(p: Tensor, eta: float) -> Tensor:
    """``1 / sqrt(||θ_row||² + 1/η²)`` per row, shaped to broadcast against ``p``."""
    rows = p.detach().float().reshape(p.shape[0], -1) if p.ndim > 1 else p.detach().float().reshape(1, -1)
    c = torch.rsqrt(rows.pow(2).sum(dim=1) + 1.0 / eta ** 2)
    return c.reshape(-1, *([1] * (p.ndim - 1))) if p.ndim > 1 else c.reshape(())


class ALLoRA(torch.optim.AdamW):
    """AdamW whose update of each row is scaled by ALLoRA's coefficient ``c_row`` (``eta`` bounds it)."""

    def __init__(self, params: Iterable[Any], *, lr: float, eta: float = 1.0, **kwargs: Any) -> None:
        require(eta > 0, "eta", eta, "must be > 0")
        super().__init__(params, lr=lr, **kwargs)
        self.eta = eta

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        moving = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        before = [(p, p.detach().clone(), row_coefficient(p, self.eta).to(p.dtype)) for p in moving]
        loss = super().step(closure)
        for p, old, c in before:
            p.copy_(old + c * (p - old))
        return loss


@OPTIMIZERS.decorator("allora")
def allora(named_params: Mapping[str, nn.Parameter], *, lr: float, weight_decay: float,
           roles: Mapping[str, str] | None = None, **options: Any) -> torch.optim.Optimizer:
    """ALLoRA over every trained tensor (option ``eta``, default 1.0)."""
    check_options("allora", options, ("eta",) + ADAM_OPTIONS)
    options = dict(options)
    eta = float(options.pop("eta", 1.0))
    return ALLoRA(list(named_params.values()), lr=lr, eta=eta, weight_decay=weight_decay, **options)
