"""DyLoRA's any-rank evaluation and export (METHODS.md entry 28). Its training-time rank sampling,
:class:`~lorakit.methods.dylora.DyLoraSampler`, lives with the method; after each step the full rank is back, so
evaluation outside training is at ``r``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import require
from ..hooks import optimized_parameters, replace_parameter
from ..inject import configs
from ..methods.dylora import DyLora, DyLoraConfig, dylora_layers, set_rank


@contextlib.contextmanager
def at_rank(model: nn.Module, b: int, name: str = "default") -> Iterator[None]:
    """Within the block, DyLoRA adapter ``name`` computes with its first ``b`` ranks (scale ``alpha / b``)."""
    config = configs(model)[name]
    assert isinstance(config, DyLoraConfig)
    require(1 <= b <= config.r, "b", b, f"must be in [1, r={config.r}]")
    set_rank(model, name, b)
    try:
        yield
    finally:
        set_rank(model, name, None)


@torch.no_grad()
def truncate(model: nn.Module, b: int, name: str = "default",
             optimizer: torch.optim.Optimizer | None = None) -> None:
    """Cut DyLoRA adapter ``name`` to its first ``b`` ranks for good (a LoRA of rank ``b``; save or export it)."""
    config = configs(model)[name]
    assert isinstance(config, DyLoraConfig)
    require(config.r_min <= b <= config.r, "b", b, f"must be in [r_min={config.r_min}, r={config.r}]")
    keep = torch.arange(b)
    for adapter in dylora_layers(model, name):
        for owner, attr, dim in _factor_slots(adapter):
            old = getattr(owner, attr)
            new = nn.Parameter(old.narrow(dim, 0, min(b, old.shape[dim])).clone(), requires_grad=old.requires_grad)
            setattr(owner, attr, new)
            if optimizer is not None and any(p is old for p in optimized_parameters(optimizer)):
                replace_parameter(optimizer, old, new, keep=keep[:new.shape[dim]], dim=dim)
    configs(model)[name] = config.replace(r=b, r_min=min(config.r_min, b),
                                          rank_pattern={k: min(v, b) for k, v in config.rank_pattern.items()})


def _factor_slots(adapter: DyLora) -> list[tuple[nn.Module, str, int]]:
    if adapter.geometry.kind == "embedding":
        return [(adapter, "lora_embedding_A", 0), (adapter, "lora_embedding_B", 1)]
    return [(adapter.lora_A, "weight", 0), (adapter.lora_B, "weight", 1)]
