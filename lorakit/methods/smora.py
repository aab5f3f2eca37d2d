"""SMoRA, Single-ranked Mixture of Experts LoRA (Zhao et al., 2025, "Each Rank Could be an Expert"; METHODS.md
entry 51).

    delta(x) = s * B diag(m(x)) A x,    m(x) = k * renormalised top-k over experts of softmax(G x),
    selected by  top-k(softmax(G x) + b)                       (b: loss-free balancing biases, selection only)

The ``r`` ranks are split into ``E = r / block`` experts of ``block`` consecutive ranks (``block = 1``: every rank is
an expert, the paper's SMoRA); a per-layer gate ``G`` (``(E, d_in)``, zero at init) scores them per token and the
``k`` best run. The paper's equivalence: an ``E``-expert mixture of rank-``block`` LoRAs ``(B_i, A_i)`` routed with
weights ``m(x)`` equals this single rank-``r`` LoRA with block gating (tested against
:class:`~lorakit.routing.weighted.WeightedRouting` over ``E`` LoRA experts cut from the same ``B``, ``A``).

Assumed where the abstract is silent: the kept weights are scaled by ``k`` so their mean is 1, hence with ``k = E``
and uniform scores (the zero gate at init) ``m(x) = 1`` and SMoRA is exactly plain LoRA; the load balance is
loss-free (Wang et al. 2024, the DeepSeek-V3 rule): after each optimizer step every layer's bias moves by
``rate * sign(mean load - load_e)``, raising the under-used experts' chance of selection without touching the
weights of the selected ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import require
from ..hooks import TrainingHook, training_rule
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from ..hosts.host import adapters_named
from .base import Capabilities, register_method
from .lora import Lora, LoraConfig


@dataclass(frozen=True)
class SmoraConfig(LoraConfig):
    """Config of SMoRA: a LoRA whose ranks are experts.

    Attributes:
        top_k: experts (blocks of ranks) active per token.
        block: ranks per expert (``r`` must be a multiple); 1 is the paper's single-rank experts.
        balance_rate: step of the loss-free balancing biases (0: no balancing).
    """

    top_k: int = 2
    block: int = 1
    balance_rate: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.block, int) and self.block >= 1 and self.r % self.block == 0, "block", self.block,
                f"must be a positive divisor of r={self.r}")
        experts = self.r // self.block
        require(isinstance(self.top_k, int) and 1 <= self.top_k <= experts, "top_k", self.top_k,
                f"must be an integer in [1, {experts}] (r / block experts)")
        require(self.balance_rate >= 0, "balance_rate", self.balance_rate, "must be >= 0")
        require(not self.rank_pattern, "rank_pattern", dict(self.rank_pattern), "is not supported by SMoRA")


@register_method("smora", SmoraConfig)
class Smora(Lora):
    """``s * B diag(m(x)) A x`` with ``m(x)`` a top-k gate over blocks of ranks (see module doc)."""

    capabilities = Capabilities(layers=frozenset({"linear"}), mergeable=False, factorable=False)

    def __init__(self, geometry: Geometry, config: SmoraConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        self.experts = config.r // config.block
        self.gate = nn.Linear(geometry.d_in, self.experts, bias=False)
        nn.init.zeros_(self.gate.weight)
        self.register_buffer("balance_bias", torch.zeros(self.experts))
        self.load: Tensor | None = None  # share of tokens per expert in the latest training forward
        w = base.weight()
        self.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)

    def expert_weights(self, x: Tensor) -> Tensor:
        """``m(x)`` per expert, ``(*tokens, E)``: ``k`` non-zero weights per token, averaging 1."""
        scores = F.softmax(self.gate(x.to(self.gate.weight.dtype)).float(), dim=-1)
        chosen = (scores + self.balance_bias.float()).topk(self.config.top_k, dim=-1).indices
        kept = torch.zeros_like(scores).scatter(-1, chosen, scores.gather(-1, chosen))
        weights = self.config.top_k * kept / kept.sum(-1, keepdim=True)
        if self.training:
            routed = (weights != 0).float().reshape(-1, self.experts)
            self.load = (routed.sum(0) / routed.sum()).detach()
        return weights

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        a, b, scale = self.live()
        h = self.geometry.down(self.dropout(x.to(a.dtype)), a)  # (..., r)
        m = self.expert_weights(x).repeat_interleave(self.config.block, dim=-1).to(h.dtype)
        return (self.geometry.up(h * m, b, self.b_bias) * scale).to(base_out.dtype)

    def fused_forward(self, x: Tensor, base: Backend) -> Tensor | None:
        return None  # the gate depends on the input: never the plain fused product

    def factors(self) -> None:
        return None  # not a fixed low-rank product: no stacked serving, no PEFT LoRA export

    def rebalance(self, rate: float) -> None:
        """The loss-free balancing step: ``b_e += rate * sign(mean load - load_e)``."""
        if self.load is not None:
            self.balance_bias.add_(rate * torch.sign(self.load.mean() - self.load).to(self.balance_bias))
            self.load = None


class SmoraBalance(TrainingHook):
    """After each optimizer step, moves the balancing biases of every layer of SMoRA adapter ``name``."""

    def __init__(self, name: str, rate: float) -> None:
        self.name, self.rate = name, rate

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for _, adapter in adapters_named(model, self.name, Smora):
            adapter.rebalance(self.rate)


@training_rule("smora")
def _rules(config: AdapterConfig, name: str, steps: int) -> list[TrainingHook]:
    assert isinstance(config, SmoraConfig)
    return [SmoraBalance(name, config.balance_rate)] if config.balance_rate > 0 else []
