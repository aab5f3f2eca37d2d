"""MoSA, Mixture of Sparse Adapters (Zhang et al., 2023, "Split & Merge"; METHODS.md entry 16).

    A = sum_{i=1..m} A (.) M_i,   B = sum_{i=1..m} B (.) N_i          (M_i, N_i: disjoint masks covering A, B)
    training step:  delta(x) = s * (B (.) N_S)(A (.) M_S) x,   M_S = sum_{i in S} M_i,  S = the sampled modules
    after tuning:   delta(x) = s * B A x                        (the merged, complete adapter)

The adapter (LoRA-shaped here, see below) is *split* into ``modules`` non-overlapping sparse modules: every entry of
``A`` and ``B`` belongs to exactly one module (a balanced random partition from ``seed``, rebuilt on load). Each
training step activates a random subset of the modules (:func:`mosa_resample`, called before the forward), so only
their entries receive gradients; the modules are *merged* back by construction, since their sum is the full
``A``, ``B``: evaluation mode (and training before any resample, or after :func:`mosa_resample` with ``k=None``)
runs the complete adapter, at exactly LoRA's cost.

Assumed (lorakit adapters add a mergeable update to one layer; the paper uses serial bottleneck adapters with a
non-linearity in ViTs): the adapter is a parallel linear bottleneck, i.e. LoRA's ``s B A`` with every LoRA option
(init, rank/alpha patterns, dropout); the paper's hierarchical sparse strategy is not implemented, and sampled
modules are not rescaled (the paper's description has no dropout-style rescaling).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import require
from ..hooks import TrainingHook, training_rule
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from ..hosts.host import adapters_named
from .base import register_method
from .lora import Lora, LoraConfig


@dataclass(frozen=True)
class MosaConfig(LoraConfig):
    """Config of a MoSA adapter: :class:`LoraConfig`'s fields plus the split.

    Attributes:
        modules: number of non-overlapping sparse modules the adapter is split into.
        seed: seed of the partition of ``A`` and ``B`` into modules.
        active_modules: modules sampled for each training step (:func:`mosa_resample`); all are used in evaluation.
    """

    modules: int = 4
    seed: int = 0
    active_modules: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.modules, int) and self.modules >= 1, "modules", self.modules,
                "must be a positive integer")
        require(isinstance(self.seed, int), "seed", self.seed, "must be an integer")
        require(isinstance(self.active_modules, int) and 1 <= self.active_modules <= self.modules, "active_modules",
                self.active_modules, f"must be an integer in [1, modules={self.modules}]")


def partition(shape: torch.Size, modules: int, gen: torch.Generator) -> Tensor:
    """A balanced random assignment of every entry of a ``shape`` tensor to one of ``modules`` modules."""
    return (torch.randperm(shape.numel(), generator=gen) % modules).view(shape)


@register_method("mosa", MosaConfig)
class Mosa(Lora):
    """LoRA whose factors, in a training step after :func:`mosa_resample`, keep only the sampled modules' entries."""

    _masks: tuple[Tensor, Tensor] | None = None  # (mask of A, mask of B) of the sampled modules; None: all modules

    def __init__(self, geometry: Geometry, config: MosaConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        gen = torch.Generator().manual_seed(config.seed)
        a, b = self.a, self.b
        self.register_buffer("mosa_module_A", partition(a.shape, config.modules, gen).to(a.device), persistent=False)
        self.register_buffer("mosa_module_B", partition(b.shape, config.modules, gen).to(b.device), persistent=False)

    @property
    def a(self) -> Tensor:
        a = super().a
        return a * self._masks[0].to(a.dtype) if self._masks is not None and self.training else a

    @property
    def b(self) -> Tensor:
        b = super().b
        return b * self._masks[1].to(b.dtype) if self._masks is not None and self.training else b

    def sample(self, active: Tensor | None) -> None:
        """Keep only the modules flagged in ``active: (modules,) bool`` in training steps (``None``: all)."""
        if active is None:
            self._masks = None
        else:
            active = active.to(self.mosa_module_A.device)
            self._masks = (active[self.mosa_module_A], active[self.mosa_module_B])

    @contextlib.contextmanager
    def complete(self) -> Iterator[None]:
        """Within the block the factors are the complete (merged) adapter's, whatever was sampled."""
        masks, self._masks = self._masks, None
        try:
            yield
        finally:
            self._masks = masks

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        with self.complete():
            return super().merge_delta(unit_scale)

    def factors(self) -> tuple[Tensor, Tensor]:
        with self.complete():
            return super().factors()

    @property
    def stochastic(self) -> bool:
        """In a training step after a resample the update is the sampled modules', not ``factors()``'s."""
        return super().stochastic or (self.training and self._masks is not None)


def mosa_resample(model: nn.Module, k: int | None = 1, generator: torch.Generator | None = None,
                  name: str = "default") -> None:
    """Activate ``k`` random modules (independently per layer) of MoSA adapter ``name`` for the next training step.

    ``k=None`` activates all of them again (the complete adapter).
    """
    for _, module in adapters_named(model, name, Mosa):
        m = module.config.modules
        if k is None:
            module.sample(None)
            continue
        require(isinstance(k, int) and 1 <= k <= m, "k", k, f"must be an integer in [1, modules={m}]")
        active = torch.zeros(m, dtype=torch.bool)
        active[torch.randperm(m, generator=generator)[:k]] = True
        module.sample(active)


class MosaResample(TrainingHook):
    """Samples ``k`` modules per layer of adapter ``name`` before each step (seeded; the sampler's state is
    checkpointed); the complete adapter after the last step."""

    def __init__(self, name: str, k: int, steps: int, seed: int = 0) -> None:
        require(isinstance(k, int) and k >= 1, "k", k, "must be a positive integer")
        self.name, self.k, self.steps = name, k, steps
        self.generator = torch.Generator().manual_seed(seed)

    def before_forward(self, model: nn.Module, step: int) -> None:
        mosa_resample(model, self.k, self.generator, self.name)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if step >= self.steps:
            mosa_resample(model, None, name=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self.generator.set_state(state["generator"])


@training_rule("mosa")
def _rules(config: AdapterConfig, name: str, steps: int) -> list[TrainingHook]:
    assert isinstance(config, MosaConfig)
    return [MosaResample(name, config.active_modules, steps, config.seed)]
