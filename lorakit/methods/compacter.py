"""Compacter (Karimi Mahabadi et al., 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers"; METHODS.md
entry 2): low-rank hypercomplex (LPHM) adapter layers.

    PHM(s, t) = sum_{i=1..n} A_i kron (s_i t_i^T),     A_i: (n, n) shared,  s_i: (k_out/n,),  t_i: (k_in/n,)

Two forms (``CompacterConfig.form``), both with ``D = PHM(s_down, t_down)`` (to the bottleneck ``k``) and
``U = PHM(s_up, t_up)`` (back out):

* ``"paper"`` (the default): the paper's serial bottleneck adapter on the host layer's output ``y = base(x)``,
  ``h = y + U GeLU(D y)`` (``D: (k, d_out)``, ``U: (d_out, k)``). Non-linear, so neither mergeable nor factorable
  (the class-level :class:`Capabilities` are this form's); merging it, or exporting it as a LoRA, is refused.
* ``"parallel"`` (the mergeable variant): a linear branch beside the layer, ``h = y + U D x`` (``D: (k, d_in)``,
  ``U: (d_out, k)``), i.e. ``dW = U D``, which merges into the weight and is exactly low rank (``factors()``, LoRA
  export); such an adapter carries its own capabilities (:attr:`Compacter.parallel_capabilities`).

``method="compacter"`` is the published adapter; ask for ``form="parallel"`` to merge it, read ``delta_weight`` /
``factors`` or export it as a plain LoRA. Adapter files written before the ``form`` field existed were trained as the
parallel form and load as such (:attr:`CompacterConfig.FILE_DEFAULTS`).

The "slow" rules ``A_i`` (``phm_rule: (n, n, n)``) are one tensor shared by every Compacter layer of the model
(:class:`CompacterRules`, stored once); each layer trains only the rank-one "fast" factors of its down and up
projections: ``n (k/n + d_down/n) + n (d_out/n + k/n)`` numbers (``d_down`` is the layer's ``d_out`` in the paper
form, its ``d_in`` in the parallel one), plus ``n^3`` shared ones.

Each PHM product is applied to ``x`` reshaped to ``X: (n, d/n)`` as ``y[p, a] = sum_i s_i[a] sum_q A_i[p, q]
(t_i . X[q])``: ``O(n (d + k) + n^3)`` per token, never forming a Kronecker product or ``dW``.

Assumptions: lorakit places an adapter on one targeted layer, so the paper form acts on that layer's output (target
the attention output and feed-forward output projections for the paper's placement); the residual is the host's
``y + contribution`` (the paper's adapter has no layer norm of its own); no PHM biases; exact (erf) GeLU. Init (the
paper's code uses Glorot-style fast weights and small random rules): ``A_i ~ N(0, 1/n)``, fast factors
Kaiming-uniform, ``s_up = 0`` so ``U = 0`` and the adapter starts as the identity (LoRA's zero ``B``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import ConfigError, LorakitError, require
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from .base import Adapter, Capabilities, SharedState, register_method


@dataclass(frozen=True)
class CompacterConfig(AdapterConfig):
    """Config of a Compacter adapter.

    Attributes:
        r: bottleneck size ``k``; a multiple of ``n``.
        n: number of Kronecker terms (the hypercomplex dimension); must divide every targeted layer's ``d_out``
            (and, in the parallel form, which reads the layer's input, its ``d_in``).
        seed: seed of the shared rules' initialisation.
        form: ``"paper"`` (default; the paper's serial bottleneck ``U GeLU(D y)`` on the layer's output ``y``; not
            mergeable) or ``"parallel"`` (linear ``U D x`` beside the layer; mergeable, exactly low rank).
    """

    #: The accepted values of ``form``.
    FORMS: ClassVar[tuple[str, ...]] = ("paper", "parallel")
    #: Values of fields that adapter files written before the field existed omit: such a file was trained as the
    #: parallel form (the only one then), so it loads as that, not as today's default.
    FILE_DEFAULTS: ClassVar[Mapping[str, Any]] = {"form": "parallel"}

    r: int = 8
    n: int = 2
    seed: int = 0
    form: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.n, int) and self.n >= 1, "n", self.n, "must be a positive integer")
        require(isinstance(self.r, int) and self.r >= 1 and self.r % self.n == 0, "r", self.r,
                f"must be a positive multiple of n={self.n}")
        require(isinstance(self.seed, int), "seed", self.seed, "must be an integer")
        require(self.form in self.FORMS, "form", self.form, f"must be one of {self.FORMS}")


class CompacterRules(SharedState):
    """The slow weights ``A_i`` shared by every Compacter layer: ``phm_rule: (n, n, n)`` (trained)."""

    def __init__(self, config: CompacterConfig) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(config.seed)
        n = config.n
        self.phm_rule = nn.Parameter(torch.randn(n, n, n, generator=gen) / math.sqrt(n))


def phm_apply(x: Tensor, rule: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """``PHM(s, t) x`` without forming it: ``x: (..., n * t_len) -> (..., n * s_len)``."""
    n = rule.shape[0]
    u = torch.einsum("...qb,ib->...iq", x.unflatten(-1, (n, -1)), t)  # (..., n_i, n_q): t_i . X[q]
    v = torch.einsum("...iq,ipq->...ip", u, rule)  # (..., n_i, n_p)
    return torch.einsum("...ip,ia->...pa", v, s).flatten(-2)  # (..., n_p * s_len)


def phm_dense(rule: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """``sum_i A_i kron (s_i t_i^T)``: ``(n * s_len, n * t_len)``."""
    n, ls, lt = rule.shape[0], s.shape[1], t.shape[1]
    return torch.einsum("ipq,ia,ib->paqb", rule, s, t).reshape(n * ls, n * lt)


@register_method("compacter", CompacterConfig)
class Compacter(Adapter):
    """``U GeLU(D base(x))`` (paper) or ``U D x`` (parallel) with shared rules ``A_i`` and rank-one fast factors.

    The class-level capabilities are the default (paper) form's; a parallel-form adapter carries its own.
    """

    capabilities = Capabilities(layers=frozenset({"linear"}), mergeable=False, factorable=False)
    parallel_capabilities = Capabilities(layers=frozenset({"linear"}), factorable=True)

    @classmethod
    def shared_state(cls, config: AdapterConfig, geometries: list[Geometry]) -> CompacterRules:
        assert isinstance(config, CompacterConfig)
        return CompacterRules(config)

    def __init__(self, geometry: Geometry, config: CompacterConfig, base: Backend, *,
                 shared: CompacterRules) -> None:
        super().__init__(geometry, config, base)
        self.hold_shared(shared)
        self.paper = config.form == "paper"
        if not self.paper:
            self.capabilities = self.parallel_capabilities
        n, k = config.n, config.r
        d_down = geometry.d_out if self.paper else geometry.d_in  # what D reads: the layer's output or input
        read = {"d_out": geometry.d_out} if self.paper else {"d_in": geometry.d_in, "d_out": geometry.d_out}
        for name, d in read.items():  # the paper form never reads the layer's input
            if d % n:
                raise ConfigError(f"n={n} is invalid: must divide every targeted layer's {name} "
                                  f"(a layer has {name}={d})")
        w = base.weight()

        def fast(length: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(n, length // n, device=w.device, dtype=w.dtype))

        self.phm_down_s, self.phm_down_t = fast(k), fast(d_down)  # (n, k/n), (n, d_down/n)
        self.phm_up_s, self.phm_up_t = fast(geometry.d_out), fast(k)  # (n, d_out/n), (n, k/n)
        for p in (self.phm_down_s, self.phm_down_t, self.phm_up_t):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        nn.init.zeros_(self.phm_up_s)

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        rule = self.shared.phm_rule
        src = base_out if self.paper else x  # serial on the layer's output (paper) or parallel on its input
        h = phm_apply(src.to(rule.dtype), rule, self.phm_down_s, self.phm_down_t)  # (..., k)
        if self.paper:
            h = F.gelu(h)
        return phm_apply(h, rule, self.phm_up_s, self.phm_up_t).to(base_out.dtype)  # (..., d_out)

    def factors(self) -> tuple[Tensor, Tensor] | None:
        if self.paper:
            return None
        rule = self.shared.phm_rule
        return phm_dense(rule, self.phm_up_s, self.phm_up_t), phm_dense(rule, self.phm_down_s, self.phm_down_t)

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        factors = self.factors()
        if factors is None:
            raise LorakitError("a Compacter adapter with form='paper' (the default: U GeLU(D y) on the layer's "
                               "output) is non-linear and has no weight update; use form='parallel' to merge")
        up, down = factors
        return up @ down  # (d_out, d_in)

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())
