"""Per-layer updates (GaLore, METHODS.md entry 33): each tensor is updated inside the backward pass, as soon as its
gradient is accumulated, and its gradient is freed at once — so at most one full-size gradient is alive.

Uses ``Tensor.register_post_accumulate_grad_hook``. The optimizer's ``step()`` then finds no gradients and does
nothing, so the mode works unchanged in the lorakit Trainer and in a plain loop. Because each update happens during
``backward()``, the mode requires one backward pass per optimizer step (no gradient accumulation, no gradient
clipping over all tensors, a single process); learning-rate schedules still apply (they edit the param groups).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError


def per_layer_updates(optimizer: torch.optim.Optimizer) -> list[Any]:
    """Switch ``optimizer`` (one with ``step_parameter``, e.g. the GaLore family) to per-layer updates.

    Returns the hook handles (also kept as ``optimizer.per_layer_handles``); ``handle.remove()`` switches back.
    """
    if not hasattr(optimizer, "step_parameter"):
        raise ConfigError(f"{type(optimizer).__name__} cannot update one tensor at a time; per-layer updates need "
                          f"an optimizer of the GaLore family (galore, fira, natural-galore)")
    if getattr(optimizer, "per_layer_handles", None):
        raise ConfigError("per-layer updates are already on for this optimizer")

    def update(param: Tensor) -> None:
        optimizer.step_parameter(param)
        param.grad = None

    handles = [p.register_post_accumulate_grad_hook(update) for g in optimizer.param_groups for p in g["params"]]
    optimizer.per_layer_handles = handles  # type: ignore[attr-defined]
    return handles
