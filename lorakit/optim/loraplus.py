"""LoRA+ (Hayou et al., 2024): AdamW with the up-projection ``B`` trained at ``ratio`` times the learning rate of
everything else (``A``, gates, magnitudes), ``lr_B = ratio · lr_A`` (the paper recommends ``ratio`` ≈ 16).

``B`` tensors are the ones whose role is ``"up"``: each adapter declares its up-projection factors
(``Adapter.up_projections``), :func:`lorakit.inject.parameter_roles` collects them and trainers pass them as ``roles``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError, require
from .registry import OPTIMIZERS

ADAM_OPTIONS = ("betas", "eps")


def check_options(name: str, options: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"optimizer {name!r} has no option(s) {unknown}; allowed: {', '.join(allowed)}")


@OPTIMIZERS.decorator("loraplus")
def loraplus(named_params: Mapping[str, nn.Parameter], *, lr: float, weight_decay: float,
             roles: Mapping[str, str] | None = None, **options: Any) -> torch.optim.Optimizer:
    """AdamW with two groups: ``B`` factors at ``ratio * lr`` (option ``ratio``, default 16), the rest at ``lr``."""
    check_options("loraplus", options, ("ratio",) + ADAM_OPTIONS)
    options = dict(options)
    ratio = float(options.pop("ratio", 16.0))
    require(ratio > 0, "ratio", ratio, "must be > 0")
    roles = roles or {}
    up = [p for k, p in named_params.items() if roles.get(k) == "up"]
    rest = [p for k, p in named_params.items() if roles.get(k) != "up"]
    if not up:
        raise ConfigError("optimizer 'loraplus' found no up-projection (B) factor among the trained tensors "
                          f"{sorted(named_params)[:3]}...; pass roles=lorakit.inject.parameter_roles(model), and "
                          "use a method with B factors (lora, dora, sora, adalora, slora, ...)")
    groups = [{"params": up, "lr": lr * ratio}] + ([{"params": rest, "lr": lr}] if rest else [])
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **options)
