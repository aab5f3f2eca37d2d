"""Natural GaLore (Das, 2024; METHODS.md entry 35): GaLore whose projected gradient is first multiplied by the inverse
empirical Fisher of the last ``s`` projected gradients, computed with Woodbury's identity.

With the last ``k <= s`` projected gradients flattened as the columns of ``H`` (``rn x k``) and damping ``lambda``:

    F       = lambda I + (1/k) H H^T
    F^-1 g  = (1/lambda) (g - H (k lambda I_k + H^T H)^-1 H^T g)        (a k x k solve, never an rn x rn matrix)

and the result goes through GaLore's Adam step. Assumed where the paper is vague (the abstract gives no algorithm):
the current gradient is part of the history it is preconditioned with; the history (``s`` stored low-rank gradients,
the method's whole memory overhead) is cleared when the projector is refitted, since older gradients live in another
subspace; the defaults ``s = 10`` and ``lambda = 1e-3`` are ours.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import require
from .galore import ProjectedAdamW, build_projected
from .registry import OPTIMIZERS


def fisher_solve(history: Tensor, grad: Tensor, damping: float) -> Tensor:
    """``(damping I + H H^T / k)^-1 g`` by Woodbury; ``history`` is ``(k, *g.shape)`` (one gradient per row)."""
    k = history.shape[0]
    dtype = torch.promote_types(grad.dtype, torch.float32)
    h = history.reshape(k, -1).to(dtype)  # (k, rn): H^T
    g = grad.reshape(-1).to(dtype)
    inner = h @ h.T + (k * damping) * torch.eye(k, device=h.device, dtype=dtype)
    correction = h.T @ torch.linalg.solve(inner, h @ g)
    return ((g - correction) / damping).reshape(grad.shape).to(grad.dtype)


class NaturalGaLore(ProjectedAdamW):
    """GaLore-AdamW on Fisher-preconditioned projected gradients; ``history`` = ``s``, ``damping`` = ``lambda``."""

    def __init__(self, *args: Any, history: int = 10, damping: float = 1e-3, **kwargs: Any) -> None:
        require(isinstance(history, int) and history >= 1, "history", history, "must be an integer >= 1")
        require(damping > 0, "damping", damping, "must be > 0")
        super().__init__(*args, **kwargs)
        self.history, self.damping = history, damping

    def init_state(self, state: dict[str, Any], p: Tensor, low_shape: tuple[int, ...]) -> None:
        state.update(history=p.new_zeros(self.history, *low_shape), history_len=0, history_pos=0)

    def on_refresh(self, state: dict[str, Any]) -> None:
        state.update(history_len=0, history_pos=0)

    def precondition(self, state: dict[str, Any], low: Tensor, group: dict[str, Any]) -> Tensor:
        state["history"][state["history_pos"]].copy_(low)
        state["history_pos"] = (state["history_pos"] + 1) % self.history
        state["history_len"] = min(state["history_len"] + 1, self.history)
        return fisher_solve(state["history"][:state["history_len"]], low, self.damping)


@OPTIMIZERS.decorator("natural-galore")
def natural_galore(named_params: Mapping[str, nn.Parameter], *, lr: float, weight_decay: float,
                   roles: Mapping[str, str] | None = None, **options: Any) -> torch.optim.Optimizer:
    """Natural GaLore-AdamW. GaLore's options plus history (10) and damping (1e-3)."""
    return build_projected(NaturalGaLore, "natural-galore", named_params, lr, weight_decay, options,
                           own=("history", "damping"))
