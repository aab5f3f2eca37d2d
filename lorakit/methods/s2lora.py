"""S2-LoRA, Sparsely Shared LoRA (Liu et al., 2024; METHODS.md entry 13): shared factors, sparse per-layer ranks.

    dW_l = s * B_g diag(lambda_l) A_g,      A_g: (r, d_in),  B_g: (d_out, r),  lambda_l: (r,),  s = alpha / r

One pair ``(A_g, B_g)`` is shared by every targeted layer of the same shape group ``g = (d_out, d_in)`` (stored once
per model in :class:`S2LoraFactors`); each layer trains only its rank-coefficient vector ``lambda_l``, kept sparse by
an L1 penalty applied as a proximal (soft-threshold) step, :func:`s2lora_prox`, after each optimizer step.
Trainable parameters: ``sum_g r (d_in + d_out) + L r``.

Assumed (the paper follows AdaLoRA, whose update this is without the orthogonality penalty): ``A_g``, ``B_g``
random (``N(0, 0.02^2)``, AdaLoRA's init) and ``lambda_l = 0``, so the adapted model starts as the base model and
the first gradient reaches ``lambda`` only; the scale is ``alpha / r`` (AdaLoRA's ``scaling / ranknum``).
The forward is two thin products, ``B_g (lambda_l * (A_g x))``, never ``dW``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, require_rank_and_alpha
from ..errors import require
from ..hooks import TrainingHook, training_rule
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from ..hosts.host import adapters_named
from .base import Adapter, Capabilities, SharedState, register_method


@dataclass(frozen=True)
class S2LoraConfig(AdapterConfig):
    """Config of an S2-LoRA adapter.

    Attributes:
        r: rank of the shared factors (the length of each layer's coefficient vector).
        alpha: the update is scaled by ``alpha / r``.
        init_std: standard deviation of the shared random factors.
        seed: seed of the shared factors' initialisation.
        l1: strength of the L1 penalty on the coefficients, applied by a proximal step after every optimizer step
            during training (:func:`s2lora_prox`; the paper's sparsity); 0: none.
    """

    r: int = 8
    alpha: float = 8.0
    init_std: float = 0.02
    seed: int = 0
    l1: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_rank_and_alpha(self.r, self.alpha)
        require(isinstance(self.init_std, (int, float)) and self.init_std > 0, "init_std", self.init_std, "must be > 0")
        require(isinstance(self.seed, int), "seed", self.seed, "must be an integer")
        require(isinstance(self.l1, (int, float)) and self.l1 >= 0, "l1", self.l1, "must be >= 0")


def group_key(geometry: Geometry) -> str:
    """Name of a layer's shape group: ``"<d_out>x<d_in>"``."""
    return f"{geometry.d_out}x{geometry.d_in}"


class S2LoraFactors(SharedState):
    """The globally shared ``A_g: (r, d_in)`` and ``B_g: (d_out, r)`` of every shape group (trained, stored once)."""

    def __init__(self, config: S2LoraConfig, geometries: list[Geometry]) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(config.seed)
        self.s2lora_A, self.s2lora_B = nn.ParameterDict(), nn.ParameterDict()
        for key, (d_out, d_in) in sorted({group_key(g): (g.d_out, g.d_in) for g in geometries}.items()):
            self.s2lora_A[key] = nn.Parameter(torch.randn(config.r, d_in, generator=gen) * config.init_std)
            self.s2lora_B[key] = nn.Parameter(torch.randn(d_out, config.r, generator=gen) * config.init_std)


@register_method("s2lora", S2LoraConfig)
class S2Lora(Adapter):
    """``delta(x) = s * B_g (lambda_l * A_g x)`` with ``A_g``, ``B_g`` shared by the layer's shape group."""

    capabilities = Capabilities(layers=frozenset({"linear"}), factorable=True)

    @classmethod
    def shared_state(cls, config: AdapterConfig, geometries: list[Geometry]) -> S2LoraFactors:
        assert isinstance(config, S2LoraConfig)
        return S2LoraFactors(config, geometries)

    def __init__(self, geometry: Geometry, config: S2LoraConfig, base: Backend, *,
                 shared: S2LoraFactors) -> None:
        super().__init__(geometry, config, base)
        self.hold_shared(shared)
        self.key = group_key(geometry)
        self.scale = config.alpha / config.r
        w = base.weight()
        self.s2lora_lambda = nn.Parameter(torch.zeros(config.r, device=w.device, dtype=w.dtype))  # (r,)

    def pair(self) -> tuple[Tensor, Tensor]:
        """This layer's shared ``(A_g: (r, d_in), B_g: (d_out, r))``."""
        return self.shared.s2lora_A[self.key], self.shared.s2lora_B[self.key]

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        a, b = self.pair()
        h = F.linear(x.to(a.dtype), a) * self.s2lora_lambda  # (..., r)
        return (F.linear(h, b) * self.scale).to(base_out.dtype)  # (..., d_out)

    def factors(self) -> tuple[Tensor, Tensor]:
        a, b = self.pair()
        return b * (self.s2lora_lambda * self.scale), a

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        b, a = self.factors()
        return b @ a  # (d_out, d_in)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {"s2lora_lambda": self.s2lora_lambda}


@torch.no_grad()
def s2lora_prox(model: nn.Module, threshold: float, name: str = "default") -> int:
    """The proximal step of ``threshold * ||lambda||_1`` on every layer of S2-LoRA adapter ``name`` (call after
    ``optimizer.step()``).

    ``lambda <- sign(lambda) * max(|lambda| - threshold, 0)`` (use ``threshold = lr * l1_weight``): coefficients
    within ``threshold`` of zero become exactly zero. Returns how many coefficients are zero afterwards.
    """
    require(threshold >= 0, "threshold", threshold, "must be >= 0")
    zeros = 0
    for _, module in adapters_named(model, name, S2Lora):
        lam = module.s2lora_lambda
        lam.copy_(lam.sign() * (lam.abs() - threshold).clamp_min(0))
        zeros += int((lam == 0).sum())
    return zeros


class S2LoraProx(TrainingHook):
    """Soft-thresholds adapter ``name``'s ``lambda`` by ``lr * l1`` after each step (``lr``: the rate that step
    used)."""

    def __init__(self, name: str, l1: float) -> None:
        require(l1 >= 0, "l1", l1, "must be >= 0")
        self.name, self.l1, self._lr = name, l1, 0.0

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self._lr = float(optimizer.param_groups[0]["lr"])

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        s2lora_prox(model, self._lr * self.l1, self.name)


@training_rule("s2lora")
def _rules(config: AdapterConfig, name: str, steps: int) -> list[TrainingHook]:
    assert isinstance(config, S2LoraConfig)
    return [S2LoraProx(name, config.l1)] if config.l1 > 0 else []
