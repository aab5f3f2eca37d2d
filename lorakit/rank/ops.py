"""Rank surgery shared by the rank hooks: resize a gated adapter's ranks together with the optimizer's state and the
model's config, and put saved ranks back on resumption.

Pruning gathers the surviving rows of every tensor and of its optimizer moments; growing appends new ranks whose
moments start at zero (:func:`lorakit.hooks.replace_parameter`). Nothing is reset and no stale moment stays.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LorakitError
from ..hooks import TrainingHook, replace_parameter
from ..hosts.host import HostLayer, adapters_named
from ..inject import configs
from ..methods.gated import GatedLora, GatedLoraConfig


def gated_layers(model: nn.Module, name: str) -> list[tuple[HostLayer, GatedLora]]:
    """Every host layer holding a gated adapter ``name``, with that adapter."""
    found = adapters_named(model, name, GatedLora)
    if not found:
        raise LorakitError(f"the model has no gated (SoRA / AdaLoRA / IncreLoRA) adapter named {name!r}")
    return found


def ranks_of(model: nn.Module, name: str) -> dict[str, int]:
    """Layer path -> current rank of adapter ``name``."""
    return {host.path: adapter.r for host, adapter in gated_layers(model, name)}


def total_rank(model: nn.Module, name: str) -> int:
    return sum(ranks_of(model, name).values())


def _record(model: nn.Module, name: str, ranks: dict[str, int]) -> None:
    config = configs(model)[name]
    assert isinstance(config, GatedLoraConfig)
    configs(model)[name] = config.with_ranks(ranks)


def resize_ranks(model: nn.Module, name: str, host: HostLayer, keep: Tensor, extra: int = 0,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
    """Keep ranks ``keep`` of adapter ``name`` on ``host`` and append ``extra`` new ones, moving ``optimizer``'s
    state along (pruned rows gathered, grown rows zero) and recording the new rank in the model's config."""
    adapter = host.adapters[name]
    assert isinstance(adapter, GatedLora)
    for tensor_name, (old, new) in adapter.resized(keep, extra).items():
        if optimizer is not None:
            replace_parameter(optimizer, old, new, keep=keep, dim=GatedLora.RANK_DIMS[tensor_name])
    _record(model, name, {host.path: adapter.r})


def restore_ranks(model: nn.Module, name: str, ranks: dict[str, int]) -> None:
    """Give adapter ``name`` the per-layer ``ranks`` a checkpoint holds, keeping tensor identity (the optimizer
    built before resumption already refers to them; the checkpoint then fills values and moments)."""
    layers = dict((host.path, adapter) for host, adapter in gated_layers(model, name))
    unknown = sorted(set(ranks) - set(layers))
    if unknown:
        raise LorakitError(f"the checkpoint holds ranks for layers this model's adapter {name!r} lacks: {unknown[:3]}")
    for path, r in ranks.items():
        if layers[path].r != r:
            layers[path].reshape_in_place(int(r))
    _record(model, name, {p: int(r) for p, r in ranks.items()})


def lr_of(optimizer: torch.optim.Optimizer, param: Tensor) -> float:
    """The current learning rate of the parameter group holding ``param``."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return float(group["lr"])
    raise LorakitError("the optimizer does not update this adapter's gate; was it built after the last resize?")


class RankHook(TrainingHook):
    """Base of the hooks that change a gated adapter's ranks: checkpoints carry the per-layer ranks, and resuming
    gives the adapter those ranks before its tensors and the optimizer's moments are loaded."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._model: nn.Module | None = None

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._model = model

    def state_dict(self) -> dict[str, Any]:
        return {} if self._model is None else {"ranks": ranks_of(self._model, self.name)}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        if "ranks" in state:
            restore_ranks(model, self.name, state["ranks"])
