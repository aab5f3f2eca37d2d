"""LISA (Pan et al., 2024; METHODS.md entry 36): layerwise importance sampling as a training hook.

Every ``K`` steps, ``gamma`` of the model's repeated blocks (transformer layers) are sampled uniformly without
replacement; only their tensors train until the next draw. Everything outside the blocks (embeddings, LM head, final
norm) trains on every step. Works on whatever the optimizer updates: all weights (full fine-tuning, as in the paper)
or the adapter tensors inside each block.

Frozen tensors get ``requires_grad=False`` (so no gradient is computed or stored for them) and their optimizer state
is dropped; a block that is sampled again starts with fresh moments, as in the reference code, which rebuilds the
optimizer at every draw. The frozen tensors stay in the optimizer's parameter groups (optimizers skip tensors without
a gradient), so a checkpoint's optimizer layout never changes and resumption needs no surgery. The sampler's RNG
state and the current draw are in :meth:`LISA.state_dict`, so a resumed run samples the same layers.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, require
from ..hooks import TrainingHook, optimized_parameters


def find_blocks(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The model's repeated blocks: the ``nn.ModuleList`` at ``path``, else the longest one of same-type modules."""
    if path is not None:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            raise ConfigError(f"layers={path!r}: the model has no such submodule") from None
        if not isinstance(found, nn.ModuleList):
            raise ConfigError(f"layers={path!r} is a {type(found).__name__}, not an nn.ModuleList of blocks")
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and len({type(b) for b in m}) == 1]
    if not lists:
        raise ConfigError("LISA found no nn.ModuleList of repeated blocks in the model; name it with layers=PATH")
    return max(lists, key=len)


class LISA(TrainingHook):
    """Train ``gamma`` uniformly sampled blocks (plus everything outside the blocks), redrawn every ``interval`` steps.

    Args:
        gamma: number of blocks trained at a time.
        interval: ``K``, steps between draws.
        layers: module path of the ``nn.ModuleList`` of blocks (default: found automatically).
        seed: seed of the sampler's own generator.
    """

    def __init__(self, gamma: int = 2, interval: int = 20, layers: str | None = None, seed: int = 0) -> None:
        require(isinstance(gamma, int) and gamma >= 1, "gamma", gamma, "must be a positive integer")
        require(isinstance(interval, int) and interval >= 1, "interval", interval, "must be a positive integer")
        self.gamma, self.interval, self.layers = gamma, interval, layers
        self.generator = torch.Generator().manual_seed(seed)
        self.active: list[int] = []
        self.drawn_at = -1
        self._blocks: list[list[Tensor]] = []
        self._optimizer: torch.optim.Optimizer | None = None

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        trained = {id(p) for p in optimized_parameters(optimizer)}
        blocks = find_blocks(model, self.layers)
        require(self.gamma <= len(blocks), "gamma", self.gamma, f"must be at most the number of blocks ({len(blocks)})")
        self._blocks = [[p for p in block.parameters() if id(p) in trained] for block in blocks]
        if not any(self._blocks):
            raise ConfigError("LISA: the optimizer updates no tensor inside the model's blocks")
        self._optimizer = optimizer
        if self.active:
            self._apply()  # resumed: keep the saved draw

    def before_forward(self, model: nn.Module, step: int) -> None:
        if self._optimizer is None:
            raise ConfigError("LISA: call on_train_begin(model, optimizer) before the first step")
        if not self.active or (step % self.interval == 0 and step != self.drawn_at):
            order = torch.randperm(len(self._blocks), generator=self.generator)
            self.active, self.drawn_at = sorted(order[:self.gamma].tolist()), step
            self._apply()

    @torch.no_grad()
    def _apply(self) -> None:
        active = set(self.active)
        for index, tensors in enumerate(self._blocks):
            for p in tensors:
                p.requires_grad_(index in active)
                if index not in active:
                    p.grad = None
                    self._optimizer.state.pop(p, None)  # type: ignore[union-attr]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "active": list(self.active), "drawn_at": self.drawn_at}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self.generator.set_state(state["generator"])
        self.active, self.drawn_at = list(state["active"]), int(state["drawn_at"])
