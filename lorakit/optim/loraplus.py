"""LoRA+ (Hayou et al., 2024): AdamW with the up-projection ``B`` trained at ``ratio`` times the learning rate of
everything else (``A``, gates, magnitudes), ``lr_B = ratio · lr_A`` (the paper recommends ``ratio`` ≈ 16).

``B`` tensors are recognised from the adapter's own tensor name (the part after ``adapters.<name>.``): ``lora_B``
(any method that names its up-projection so) or ``lora_embedding_B``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError, require
from .registry import OPTIMIZERS

ADAM_OPTIONS = ("betas", "eps")
UP_PROJECTIONS = ("lora_B", "lora_embedding_B")


def check_options(name: str, options: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"optimizer {name!r} has no option(s) {unknown}; allowed: {', '.join(allowed)}")


def is_up_projection(key: str) -> bool:
    """Whether a trainable-parameter name (``<layer>.adapters.<name>.<tensor>``) is a ``B`` factor."""
    _, sep, rest = key.rpartition(".adapters.")
    tensor = rest.split(".", 1)[1] if sep and "." in rest else key
    return tensor.split(".", 1)[0] in UP_PROJECTIONS


@OPTIMIZERS.decorator("loraplus")
def loraplus(named_params: Mapping[str, nn.Parameter], *, lr: float, weight_decay: float,
             **options: Any) -> torch.optim.Optimizer:
    """AdamW with two groups: ``B`` factors at ``ratio * lr`` (option ``ratio``, default 16), the rest at ``lr``."""
    check_options("loraplus", options, ("ratio",) + ADAM_OPTIONS)
    options = dict(options)
    ratio = float(options.pop("ratio", 16.0))
    require(ratio > 0, "ratio", ratio, "must be > 0")
    up = [p for k, p in named_params.items() if is_up_projection(k)]
    rest = [p for k, p in named_params.items() if not is_up_projection(k)]
    if not up:
        raise ConfigError("optimizer 'loraplus' found no B factor (lora_B / lora_embedding_B) among the trained "
                          f"tensors: {sorted(named_params)[:3]}...")
    groups = [{"params": up, "lr": lr * ratio}] + ([{"params": rest, "lr": lr}] if rest else [])
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **options)
