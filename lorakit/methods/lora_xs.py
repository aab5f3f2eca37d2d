"""Three-factor low-rank adapters ``h = W0 x + s B M A x``: LoRA-XS / LoRA-SB / IntTune, and SLoRA / NLoRA.

* LoRA-XS (Bałazy et al., 2024) — ``B (d_out, r)`` and ``A (r, d_in)`` frozen, only the ``(r, r)`` matrix ``M``
  (``lora_R``) trained: ``r^2`` parameters per layer. Built-in init ``"svd"``: ``B = U_r S_r``, ``A = V_r^T`` of
  the base weight and ``M = 0`` (the paper draws ``M ~ N(0, 1e-5)``; zero keeps the base output exactly, and
  ``dL/dM = s B^T G A^T`` is non-zero). With ``init="lora-sb"`` this is LoRA-SB (METHODS.md entry 23), with
  ``init="nlora"`` it is NLoRA's IntTune (entry 24).
* SLoRA (METHODS.md entry 24) — the same update with all three factors trained; built-in init ``"kaiming"``
  (``A``, ``M`` Kaiming-uniform, ``B = 0``, as in the NLoRA code). With ``init="nlora"`` this is NLoRA.

Shapes follow :mod:`lorakit.hosts.geometry` (convolutions: ``A`` is a kernel, ``M`` and ``B`` are 1x1 kernels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, require_rank_and_alpha
from ..errors import require
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from ..init.layout import BaseRewrite, RewritesBase, base_matrix, factor_dtype
from ..init.linalg import top_svd
from ..init.registry import INITS, Factors, check_init, options_of
from .base import Adapter, Capabilities, register_method


@dataclass(frozen=True)
class LoraXsConfig(AdapterConfig):
    """Config of a LoRA-XS adapter (only ``M`` trained).

    Attributes:
        r: rank (capped at ``min(rows, cols)`` of the layer's weight matrix).
        alpha: the update is multiplied by ``alpha / r``.
        init: ``"svd"`` or a registered three-factor initialiser (``"lora-sb"``, ``"nlora"``).
        init_options: options of a registered initialiser.
    """

    builtin_inits: ClassVar[tuple[str, ...]] = ("svd",)

    r: int = 8
    alpha: float = 8.0
    init: str = "svd"
    init_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_rank_and_alpha(self.r, self.alpha)
        check_init(self.init, self.init_options, "BMA", self.builtin_inits)

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class SloraConfig(LoraXsConfig):
    """Config of a SLoRA adapter (all three factors trained); ``init`` is ``"kaiming"`` or ``"nlora"``/``"lora-sb"``."""

    builtin_inits: ClassVar[tuple[str, ...]] = ("kaiming",)

    init: str = "kaiming"


@register_method("lora-xs", LoraXsConfig)
class LoraXs(RewritesBase, Adapter):
    """``delta(x) = s * B M A x``, applied as three small products (never forming ``B M A``)."""

    capabilities = Capabilities(factorable=True)
    trained: tuple[str, ...] = ("lora_R",)

    def __init__(self, geometry: Geometry, config: LoraXsConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        self.scale = config.scale
        rows, cols = base_matrix(geometry, base).shape
        r = min(config.r, rows, cols)
        self.lora_A = nn.Parameter(torch.empty(geometry.down_shape(r)))  # (r, d_in[, *kernel])
        self.lora_R = nn.Parameter(torch.empty(r, r))  # (r, r)
        self.lora_B = nn.Parameter(torch.empty(geometry.up_shape(r)))  # (d_out, r[, 1...])
        self._rewrite: BaseRewrite | None = None
        self.reset(config.init, base)
        w = base.weight()
        self.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)

    @property
    def r(self) -> int:
        return self.lora_R.shape[0]

    @torch.no_grad()
    def reset(self, init: str, base: Backend) -> None:
        """The built-in init, or a registered one (data-driven ones start from the built-in until initialised)."""
        spec = INITS.get(init) if init in INITS else None
        self._builtin_init(self.config.builtin_inits[0], base)
        if spec is not None and not spec.needs_data:
            w = base_matrix(self.geometry, base)  # (rows, cols)
            factors = spec.fn(w, self.r, self.scale, **options_of(init, self.config.init_options))
            self.apply_factors(factors, factor_dtype(base, self.lora_A.dtype))

    def _builtin_init(self, init: str, base: Backend) -> None:
        if init == "svd":
            u, s, vh = top_svd(base_matrix(self.geometry, base), self.r)  # (rows, r), (r,), (r, cols)
            self.lora_B.copy_((u * s).reshape(self.lora_B.shape))
            self.lora_A.copy_(vh.reshape(self.lora_A.shape))
            nn.init.zeros_(self.lora_R)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_R, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def apply_factors(self, factors: Factors, dtype: torch.dtype) -> None:
        """Start from an initialiser's ``B``, ``M``, ``A`` (rounded to ``dtype``); a base rewrite waits for attach."""
        require(factors.m is not None, "init", self.config.init, "produces two factors (B A); use it with LoRA/DoRA")
        b, m, a = (t.to(dtype) for t in (factors.b, factors.m, factors.a))
        self.lora_B.copy_(b.reshape(self.lora_B.shape))
        self.lora_R.copy_(m)
        self.lora_A.copy_(a.reshape(self.lora_A.shape))
        if factors.compensate:
            self._rewrite = BaseRewrite(up=self.scale * b @ m, down=a)
        elif factors.base is not None:
            self._rewrite = BaseRewrite(replacement=factors.base)


    def _b_eff(self) -> Tensor:  # (d_out, r[, 1...]): s * B M
        b = self.lora_B.reshape(self.lora_B.shape[0], self.r)
        return (b @ self.lora_R * self.scale).reshape(self.lora_B.shape)

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        if x.is_floating_point():  # embeddings take token ids
            x = x.to(self.lora_A.dtype)
        h = self.geometry.down(x, self.lora_A)  # (..., r)
        h = self.geometry.up(h, self.lora_R.reshape(self.r, self.r, *self.lora_B.shape[2:]))  # (..., r)
        return (self.geometry.up(h, self.lora_B) * self.scale).to(base_out.dtype)  # (..., d_out)

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        return self.geometry.compose(self._b_eff(), self.lora_A)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.geometry.factored(self._b_eff(), self.lora_A)  # s B M, A

    def trainable(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in self.trained}

    def up_projections(self) -> dict[str, nn.Parameter]:
        return {k: v for k, v in self.trainable().items() if v is self.lora_B}


@register_method("slora", SloraConfig)
class Slora(LoraXs):
    """SLoRA / NLoRA: ``s B M A`` with all three factors trained."""

    trained = ("lora_A", "lora_R", "lora_B")
