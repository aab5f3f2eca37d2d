"""DyLoRA's training-time rank sampling and its any-rank evaluation and export (METHODS.md entry 28).

Each step :class:`DyLoraSampler` draws ``b ~ U{r_min, ..., r}`` (the paper's uniform ``p_B``) from its own seeded
generator and sets it on every DyLoRA layer of the adapter (clamped to a layer's rank when ``rank_pattern`` gives
layers different ranks); after the step the full rank is back, so evaluation outside training is at ``r``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import LorakitError, require
from ..inject import configs, hosts
from ..methods.dylora import DyLora, DyLoraConfig
from ..train.hooks import TrainingHook, optimized_parameters, replace_parameter


def dylora_layers(model: nn.Module, name: str) -> list[DyLora]:
    layers = [h.adapters[name] for h in hosts(model) if isinstance(h.adapters[name] if name in h.adapters else None,
                                                                    DyLora)]
    if not layers:
        raise LorakitError(f"the model has no DyLoRA adapter named {name!r}")
    return layers


def _set(model: nn.Module, name: str, b: int | None) -> None:
    for adapter in dylora_layers(model, name):
        adapter.set_rank(b)


@contextlib.contextmanager
def at_rank(model: nn.Module, b: int, name: str = "default") -> Iterator[None]:
    """Within the block, DyLoRA adapter ``name`` computes with its first ``b`` ranks (scale ``alpha / b``)."""
    config = configs(model)[name]
    assert isinstance(config, DyLoraConfig)
    require(1 <= b <= config.r, "b", b, f"must be in [1, r={config.r}]")
    _set(model, name, b)
    try:
        yield
    finally:
        _set(model, name, None)


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


class DyLoraSampler(TrainingHook):
    """Samples the step's rank before the forward pass and restores the full rank after the step."""

    def __init__(self, name: str = "default", r_min: int = 1, seed: int = 0) -> None:
        require(r_min >= 1, "r_min", r_min, "must be >= 1")
        self.name, self.r_min = name, r_min
        self.generator = torch.Generator().manual_seed(seed)
        self.last: int | None = None

    def before_forward(self, model: nn.Module, step: int) -> None:
        r = max(a.a.shape[0] for a in dylora_layers(model, self.name))
        self.last = int(torch.randint(self.r_min, r + 1, (), generator=self.generator))
        _set(model, self.name, self.last)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        _set(model, self.name, None)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
