"""DoRA (Liu et al., 2024): weight-decomposed low-rank adaptation.

    W' = m * (W0 + s B A) / ||W0 + s B A||_c        (one norm per output unit)

so ``y = g * (W0 x + s B A x) + b`` with ``g = m / n``. As in the paper (section 4.3) and PEFT, the norm ``n``
is treated as a constant in backward. The adapter returns the contribution to add to the base output,
``(g - 1) * (W0 x) + g * s B A x``; merged, ``W' = g W0 + g s B A``.

The norm is computed without forming ``B A`` (PEFT rebuilds ``B A`` and ``W0 + s B A`` every forward):

    n_i^2 = ||W0_i||^2 + 2 s <(W0 A^T)_i, B_i> + s^2 <(B (A A^T))_i, B_i>

``||W0_i||^2`` is cached while the base weight is unchanged; the rest costs one ``(d_out, d_in) x (d_in, r)``
GEMM and ``O((d_in + d_out) r^2)``. Convolutions use the same formula on the flattened kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import require
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry, per_unit
from ..kernels.lora_linear import lora_linear
from .base import Capabilities, register_method
from .lora import Lora, LoraConfig


@dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """DoRA takes LoRA's fields; the magnitude vector starts at the base weight's row norms."""


@register_method("dora", DoraConfig)
class Dora(Lora):
    capabilities = Capabilities(layers=frozenset({"linear", "conv"}), factorable=False)

    def __init__(self, geometry: Geometry, config: DoraConfig, base: Backend) -> None:
        require(not config.lora_bias, "lora_bias", True, "is not supported with DoRA")
        super().__init__(geometry, config, base)
        self._base_norm_cache: tuple[tuple[int, int], Tensor] | None = None
        # (d_out,) on linear layers, (1, d_out, 1, ...) on convolutions: PEFT's shapes
        self.lora_magnitude_vector = nn.Parameter(geometry.channel(self.column_norm(base)).to(self.a.dtype))

    def attach(self, base: Backend) -> None:
        """After an initialiser's base rewrite, the magnitude restarts at the new ``||W_res + s B A||``."""
        rewrites = self._rewrite is not None
        super().attach(base)
        if rewrites:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.geometry.channel(self.column_norm(base)))

    @torch.no_grad()
    def column_norm(self, base: Backend) -> Tensor:
        """``||W0 + s B A||`` per output unit, in float32, without forming ``B A``."""
        w = self.geometry.matrix(base.weight())  # (d_out, k)
        a = self.a.reshape(self.a.shape[0], -1).to(w.dtype)  # (r, k)
        b = self.geometry.matrix(self.b).float()  # (d_out, r)
        wa = (w @ a.t()).float()  # (d_out, r)
        aat = a.float() @ a.float().t()  # (r, r)
        s = self.scale
        sq = self._base_sq_norm(base, w) + 2 * s * (wa * b).sum(1) + s * s * ((b @ aat) * b).sum(1)
        return sq.clamp_min(0).sqrt()

    def _base_sq_norm(self, base: Backend, w: Tensor) -> Tensor:
        key = base.version()
        if self._base_norm_cache is None or self._base_norm_cache[0] != key:
            self._base_norm_cache = (key, w.float().pow(2).sum(1))
        return self._base_norm_cache[1]

    def magnitude_scale(self, base: Backend) -> Tensor:
        """``g = m / n`` per output unit; ``n`` is detached (DoRA section 4.3)."""
        m = self.lora_magnitude_vector.reshape(-1)
        return m / self.column_norm(base).to(m.dtype)

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        g = self.geometry.channel(self.magnitude_scale(base))
        out_dtype = base_out.dtype
        if self.training and self.config.dropout > 0:  # as PEFT: W0 x recomputed on the dropped-out input
            x = self.dropout(x)
            base_out = base.forward(x)
        lora = self.lora_out(x, apply_dropout=False)
        base_no_bias = base_out if base.bias is None else base_out - self.geometry.channel(base.bias)
        return ((g - 1) * base_no_bias + g * lora).to(out_dtype)

    def fused_forward(self, x: Tensor, base: Backend) -> Tensor | None:
        if not self.fused_usable(x, base):
            return None
        return lora_linear(x, base.weight(), base.bias, self.a, self.b, self.scale, self.magnitude_scale(base))

    def merge_scale(self, base: Backend) -> Tensor:
        return self.magnitude_scale(base).float()

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        lora = self.geometry.compose(self.b, self.a).float() * self.scale
        return per_unit(unit_scale, lora) * lora
