"""LoRA (Hu et al., 2021), rsLoRA scaling (Kalajdzievski, 2023) and LoRA-FA / FFA-LoRA (frozen ``A``).

    h = W0 x + s * B A x,      s = alpha / r   (rsLoRA: s = alpha / sqrt(r))

``A`` is ``(r, d_in)`` (``(r, d_in, *kernel)`` on convolutions), ``B`` is ``(d_out, r)``; ``B = 0`` at init
so the adapted model starts as the base model. LoRA-FA (Zhang et al., 2023) and FFA-LoRA (Sun et al., 2024,
METHODS.md entry 61) keep the random ``A`` frozen and train only ``B``: the same forward, a different
declared trainable set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, check_patterns, pattern_value, require_rank_and_alpha
from ..errors import require
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry, LinearGeometry
from ..init.layout import BaseRewrite, RewritesBase, base_matrix, factor_dtype
from ..init.registry import INITS, Factors, check_init, options_of
from ..kernels.lora_linear import lora_linear
from .base import Adapter, Capabilities, register_method

LORA_INITS = ("kaiming", "gaussian", "random")


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """Config of a LoRA adapter (field names follow PEFT where PEFT has the same thing).

    Attributes:
        r: rank.
        alpha: scale numerator; the update is multiplied by ``alpha / r`` (or ``alpha / sqrt(r)``).
        dropout: dropout probability on the adapter's input.
        use_rslora: scale by ``alpha / sqrt(r)`` (rsLoRA).
        init: ``"kaiming"`` (PEFT's default: Kaiming-uniform ``A``, zero ``B``), ``"gaussian"`` (``A ~ N(0, 1/r)``,
            zero ``B``), ``"random"`` (both random: not identity at init; for tests and experiments), or a registered
            initialiser of ``B A`` factors (:mod:`lorakit.init`: ``"pissa"``, ``"olora"``, ``"loftq"`` run when the
            adapter is built; ``"lora-ga"``, ``"eva"`` run on :func:`lorakit.initialize`).
        init_options: options of a registered initialiser (e.g. ``{"niter": 4}`` for PiSSA's fast SVD).
        lora_bias: give ``B`` a trainable bias (PEFT's ``lora_bias``).
        rank_pattern / alpha_pattern: per-module ``r`` / ``alpha`` by regex on the module name (PEFT's rule).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    init_options: Mapping[str, Any] = field(default_factory=dict)
    lora_bias: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_rank_and_alpha(self.r, self.alpha)
        require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check_init(self.init, self.init_options, "BA", LORA_INITS)
        check_patterns("rank_pattern", self.rank_pattern)
        check_patterns("alpha_pattern", self.alpha_pattern)
        for key, r in self.rank_pattern.items():
            require(isinstance(r, int) and r >= 1, f"rank_pattern[{key!r}]", r, "must be a positive integer")
        for key, a in self.alpha_pattern.items():
            require(isinstance(a, (int, float)) and a > 0, f"alpha_pattern[{key!r}]", a, "must be > 0")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def for_module(self, module_name: str) -> "LoraConfig":
        r = pattern_value(self.rank_pattern, module_name, self.r)
        alpha = pattern_value(self.alpha_pattern, module_name, self.alpha)
        if r == self.r and alpha == self.alpha:
            return self
        return self.replace(r=r, alpha=alpha, rank_pattern={}, alpha_pattern={})


@dataclass(frozen=True)
class LoraFAConfig(LoraConfig):
    """LoRA-FA / FFA-LoRA: LoRA with the random down-projection ``A`` frozen."""


class _Factor(nn.Module):
    """Holds one factor as ``.weight`` (and optionally ``.bias``) so state-dict keys read ``lora_A.weight``."""

    def __init__(self, shape: tuple[int, ...], bias_size: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(bias_size)) if bias_size is not None else None


@register_method("lora", LoraConfig)
class Lora(RewritesBase, Adapter):
    """``delta(x) = s * B A dropout(x)``; never forms ``B A`` in the forward pass."""

    capabilities = Capabilities(factorable=True)
    train_a = True

    def __init__(self, geometry: Geometry, config: LoraConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        require(not (config.lora_bias and geometry.kind == "embedding"), "lora_bias", True,
                "is not supported on embedding layers")
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        a_shape, b_shape = geometry.down_shape(config.r), geometry.up_shape(config.r)
        if geometry.kind == "embedding":  # PEFT's names and parameter layout for embeddings
            self.lora_embedding_A = nn.Parameter(torch.empty(a_shape))
            self.lora_embedding_B = nn.Parameter(torch.empty(b_shape))
        else:
            self.lora_A = _Factor(a_shape)
            self.lora_B = _Factor(b_shape, geometry.d_out if config.lora_bias else None)
        self._rewrite: BaseRewrite | None = None
        self.base_replaced = False  # an initialiser replaced the base (LoftQ): only valid on that base
        self.reset(config.init, base)
        w = base.weight()
        self.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)

    @property
    def a(self) -> Tensor:  # (r, d_in[, *kernel])
        return self.lora_embedding_A if self.geometry.kind == "embedding" else self.lora_A.weight

    @property
    def b(self) -> Tensor:  # (d_out, r[, 1...])
        return self.lora_embedding_B if self.geometry.kind == "embedding" else self.lora_B.weight

    @property
    def b_bias(self) -> Tensor | None:
        return None if self.geometry.kind == "embedding" else self.lora_B.bias

    @torch.no_grad()
    def reset(self, init: str, base: Backend) -> None:
        """Initialise the factors: PEFT's rules (embeddings: ``A = 0``, ``B ~ N(0, 1)``), or a registered initialiser.

        Data-driven initialisers start from the ``"kaiming"`` rule here; :func:`lorakit.initialize` replaces it.
        """
        if init in INITS:
            self._builtin_init("kaiming")
            spec = INITS.get(init)
            if not spec.needs_data:
                w = base_matrix(self.geometry, base)  # (rows, cols)
                factors = spec.fn(w, self.config.r, self.scale, **options_of(init, self.config.init_options))
                self.apply_factors(factors, factor_dtype(base, self.a.dtype))
        else:
            self._builtin_init(init)

    def _builtin_init(self, init: str) -> None:
        a, b = self.a, self.b
        if init == "random":
            nn.init.normal_(a, std=a[0].numel() ** -0.5)
            nn.init.normal_(b, std=b.shape[1] ** -0.5)
        elif self.geometry.kind == "embedding":
            nn.init.zeros_(a)
            nn.init.normal_(b)
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / self.config.r)
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    @torch.no_grad()
    def apply_factors(self, factors: Factors, dtype: torch.dtype) -> None:
        """Start from an initialiser's ``B``, ``A`` (rounded to ``dtype``); a base rewrite waits for :meth:`attach`.

        A compensated start records ``B0, A0`` as ``init_lora_B`` / ``init_lora_A`` (not saved) so the adapter can
        be exported as a plain LoRA on the original base (:func:`lorakit.export_lora`).
        """
        require(factors.m is None, "init", self.config.init,
                "produces three factors (B M A); use it with a three-factor method (lora-xs, slora)")
        b = factors.b.to(dtype).reshape(self.b.shape)
        a = factors.a.to(dtype).reshape(self.a.shape)
        self.b.copy_(b)
        self.a.copy_(a)
        if factors.compensate:
            require(not hasattr(self, "init_lora_A"), "init", self.config.init, "was already applied to this adapter")
            self.register_buffer("init_lora_B", b.clone(), persistent=False)
            self.register_buffer("init_lora_A", a.clone(), persistent=False)
            self._rewrite = BaseRewrite(up=self.scale * b.reshape(b.shape[0], -1), down=a.reshape(a.shape[0], -1))
        elif factors.base is not None:
            self._rewrite = BaseRewrite(replacement=factors.base)
            self.base_replaced = True

    @property
    def reproducible_from_file(self) -> bool:
        """False when a data-driven initialiser (LoRA-GA, ...) rewrote the base: loading cannot redo that."""
        rewrote = hasattr(self, "init_lora_A")
        return not (rewrote and self.config.init in INITS and INITS.get(self.config.init).needs_data)


    def live(self) -> tuple[Tensor, Tensor, float]:
        """``(A, B, s)`` as the forward pass and merging use them (DyLoRA overrides this to truncate the rank)."""
        return self.a, self.b, self.scale

    def lora_out(self, x: Tensor, apply_dropout: bool = True) -> Tensor:
        """``s * B A dropout(x)`` in the adapter's dtype."""
        a, b, scale = self.live()
        if x.is_floating_point():  # embeddings take token ids
            x = x.to(a.dtype)
            x = self.dropout(x) if apply_dropout else x
        h = self.geometry.down(x, a)  # (..., r)
        return self.geometry.up(h, b, self.b_bias) * scale  # (..., d_out)

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        return self.lora_out(x).to(base_out.dtype)

    def fused_usable(self, x: Tensor, base: Backend) -> bool:
        """The fused kernel applies: dense linear base, no active dropout, no lora_bias, the input in the base's
        dtype, and the factors in it too, except on an accelerator, where float32 factors on a bf16/fp16 base run
        in the base's dtype (mixed precision: on a CPU without fast bf16 the float32 path is both faster and exact).

        Not on a quantised base: the kernel would keep the dequantised weight alive for backward (QLoRA's memory).
        """
        if not base.materialized:
            return False
        w = base.weight()
        return (
            isinstance(self.geometry, LinearGeometry)
            and (self.config.dropout == 0 or not self.training)
            and self.b_bias is None
            and not w.requires_grad
            and x.dtype == w.dtype
            and (self.a.dtype == w.dtype or x.device.type != "cpu")
        )

    def fused_forward(self, x: Tensor, base: Backend) -> Tensor | None:
        if not self.fused_usable(x, base):
            return None
        return lora_linear(x, base.weight(), base.bias, *self.live())

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        a, b, scale = self.live()
        return self.geometry.compose(b, a) * scale

    def factors(self) -> tuple[Tensor, Tensor]:
        a, b, scale = self.live()
        return self.geometry.factored(b * scale, a)

    def trainable(self) -> dict[str, nn.Parameter]:
        params = dict(self.named_parameters())
        if not self.train_a:
            params = {k: v for k, v in params.items() if v is not self.a}
        return params

    def up_projections(self) -> dict[str, nn.Parameter]:
        return {k: v for k, v in self.trainable().items() if v is self.b}

    def bias_delta(self) -> Tensor | None:
        return None if self.b_bias is None else self.b_bias * self.scale


@register_method("lora-fa", LoraFAConfig)
class LoraFA(Lora):
    """LoRA-FA / FFA-LoRA: ``A`` frozen at its random init, only ``B`` (and ``lora_bias``) trained."""

    train_a = False
