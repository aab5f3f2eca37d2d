"""CP-LoRA and CP-DoRA (METHODS.md entry 9, "LoRA-based methods on Unet for transfer learning in SAH segmentation").

CP-LoRA: the convolution-kernel update is a rank-``R`` CP (CANDECOMP/PARAFAC) tensor over its modes

    dW = s * sum_{i=1..R}  a_i o b_i o c_i o d_i ...      over (C_out, C_in, k_1, k_2, ...),   s = alpha / R

applied without forming ``dW`` as three cheap convolutions: a 1x1 projection ``C_in -> R`` (the ``b_i``), a depthwise
convolution of each component with its separable kernel ``c_i o d_i ...`` (``groups = R``, the layer's stride,
padding and dilation), and a 1x1 expansion ``R -> C_out`` (the ``a_i``). On Linear layers (N = 2) it is a rank-``R``
LoRA ``sum_i a_i b_i^T``. ``dW`` is exactly rank ``<= R`` in the flattened layout, so :meth:`CpLora.factors` is exact.

CP-DoRA applies DoRA's magnitude/direction split on top (``W' = m (W0 + dW) / ||W0 + dW||``, one norm per output
channel, ``m`` starting at ``||W0||``, the norm treated as a constant in backward as in DoRA); the norm is computed
from the CP factors without forming ``dW``. "conv-DoRA" itself is lorakit's ``dora`` on a convolution.

Assumed (the paper's abstract gives the decomposition only): the output-side factor ``a`` starts at zero (so
``dW = 0``), the other factors ``N(0, 1/len)``; the scale is ``alpha / R`` as in LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, require_rank_and_alpha
from ..hosts.backend import Backend
from ..hosts.geometry import ConvGeometry, Geometry, per_unit
from .base import Adapter, Capabilities, base_product, register_method
from .flora_n import unit_kernel


@dataclass(frozen=True)
class CpLoraConfig(AdapterConfig):
    """Config of a CP-LoRA adapter.

    Attributes:
        r: CP rank ``R`` (number of rank-one components).
        alpha: the update is scaled by ``alpha / r``.
    """

    r: int = 8
    alpha: float = 8.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_rank_and_alpha(self.r, self.alpha)


@dataclass(frozen=True)
class CpDoraConfig(CpLoraConfig):
    """CP-DoRA takes CP-LoRA's fields; the magnitude starts at the base weight's per-output-channel norms."""


def _normal(length: int, r: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(length, r) * length ** -0.5)


@register_method("cp-lora", CpLoraConfig)
class CpLora(Adapter):
    """``delta(x) = s * a-expand(depthwise(c o d ...)(b-project(x)))``."""

    capabilities = Capabilities(layers=frozenset({"linear", "conv"}), factorable=True)

    def __init__(self, geometry: Geometry, config: CpLoraConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        kernel = geometry.kernel_size if isinstance(geometry, ConvGeometry) else ()
        self.kernel = kernel
        self.scale = config.alpha / config.r
        self.cp_out = nn.Parameter(torch.zeros(geometry.d_out, config.r))  # a_i as columns
        self.cp_in = _normal(geometry.d_in, config.r)  # b_i
        self.cp_kernel = nn.ParameterList([_normal(k, config.r) for k in kernel])  # c_i, d_i, ...
        w = base.weight()
        self.to(device=w.device, dtype=w.dtype)

    def component_kernels(self) -> Tensor:
        """``(R, *kernel)``: each component's separable spatial kernel ``c_i o d_i ...`` (``(R,)`` ones on Linear)."""
        k = torch.ones(self.config.r, dtype=self.cp_out.dtype, device=self.cp_out.device)
        for u in self.cp_kernel:  # u: (k_j, R)
            k = k.unsqueeze(-1) * u.t().reshape(self.config.r, *([1] * (k.dim() - 1)), -1)
        return k

    def cp_product(self, x: Tensor) -> Tensor:
        """``s dW x`` through the three products, in the adapter's dtype."""
        g = self.geometry
        x = x.to(self.cp_out.dtype)
        h = g.up(x, unit_kernel(g, self.cp_in.t()))  # (B, R, *spatial): b-projection
        if isinstance(g, ConvGeometry):
            conv = getattr(F, f"conv{g.ndim}d")
            depthwise = self.component_kernels().unsqueeze(1)  # (R, 1, *kernel)
            h = conv(h, depthwise, None, g.stride, g.padding, g.dilation, self.config.r)  # (B, R, *spatial')
        return g.up(h, unit_kernel(g, self.cp_out)) * self.scale  # (B, d_out, *spatial')

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        return self.cp_product(x).to(base_out.dtype)

    def cp_factors(self) -> tuple[Tensor, Tensor]:
        """``dW = B A`` with ``B = s a: (d_out, R)`` and ``A = [b_i o c_i o ...]: (R, d_in * prod(kernel))``."""
        k = self.component_kernels()
        side = self.cp_in.t().reshape(self.config.r, -1, *([1] * (k.dim() - 1))) * k.unsqueeze(1)  # (R, d_in, *k)
        return self.cp_out * self.scale, side.reshape(self.config.r, -1)

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        b, a = self.cp_factors()
        delta = (b @ a).reshape(self.geometry.d_out, self.geometry.d_in, *self.kernel)
        return delta if unit_scale is None else per_unit(unit_scale, delta) * delta

    def factors(self) -> tuple[Tensor, Tensor] | None:
        return self.cp_factors()

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())


@register_method("cp-dora", CpDoraConfig)
class CpDora(CpLora):
    """``W' = m (W0 + dW) / ||W0 + dW||`` with the CP update ``dW``; contribution ``(g - 1) W0 x + g dW x``."""

    capabilities = Capabilities(layers=frozenset({"linear", "conv"}))

    def __init__(self, geometry: Geometry, config: CpDoraConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        norm = self.geometry.matrix(base.weight()).float().norm(dim=1)
        self.magnitude = nn.Parameter(norm.to(self.cp_out))  # (d_out,)

    @torch.no_grad()
    def row_norm(self, base: Backend) -> Tensor:
        """``||W0 + dW||`` per output unit (float32) from the factors: ``dW = B A`` is never formed."""
        w = self.geometry.matrix(base.weight()).float()  # (d_out, k)
        b, a = (t.float() for t in self.cp_factors())  # (d_out, R), (R, k)
        sq = w.pow(2).sum(1) + 2 * ((w @ a.t()) * b).sum(1) + ((b @ (a @ a.t())) * b).sum(1)
        return sq.clamp_min(0).sqrt()

    def magnitude_scale(self, base: Backend) -> Tensor:
        return self.magnitude / self.row_norm(base).to(self.magnitude.dtype)  # g = m / ||W0 + dW||

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        g = self.geometry.channel(self.magnitude_scale(base))
        w0x = base_product(self.geometry, base_out, base).to(self.cp_out.dtype)
        return ((g - 1) * w0x + g * self.cp_product(x)).to(base_out.dtype)

    def merge_scale(self, base: Backend) -> Tensor:
        return self.magnitude_scale(base).float()

    def factors(self) -> None:
        return None  # the merged weight also rescales W0: not a low-rank update
