"""FLoRA for N-dimensional parameters (Si et al., 2024; METHODS.md entry 8): a Tucker-structured update.

    dW = s * G x_1 U_out x_2 U_in x_3 U_k1 ... x_N U_k(N-2),      s = alpha / r

``G: (r_out, r_in, *r_k)`` is a low-rank core that keeps the layer's topology (a convolution kernel stays a
``C_out x C_in x k x ...`` tensor instead of being flattened), ``U_out: (d_out, r_out)``, ``U_in: (d_in, r_in)``,
``U_ki: (k_i, r_ki)``. On Linear layers (N = 2) ``dW = s U_out G U_in^T``, a LoRA with an ``r x r`` core.

Applied without forming ``dW``: project the input's channels with ``U_in^T`` (a 1x1 product), convolve in the
``r_in -> r_out`` core space with the small kernel ``K = G x_3 U_k1 ...`` (the layer's stride, padding and
dilation), and expand with ``U_out`` (a 1x1 product). ``dW = U_out (K x_2 U_in)`` is exactly rank ``<= r_out``, so
:meth:`FloraN.factors` is exact.

Assumed (the paper leaves them open; METHODS.md says "verify"): the core ``G`` starts at zero (so ``dW = 0``) and
the factor matrices start with orthonormal columns (``nn.init.orthogonal_``), so ``||dW||_F = s ||G||_F`` at start;
one rank ``r`` for both channel modes, ``kernel_r`` for every kernel mode; every mode's rank is capped at that mode's
size (a larger Tucker rank adds parameters but no expressivity).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import require
from ..hosts.backend import Backend
from ..hosts.geometry import ConvGeometry, Geometry
from .base import Adapter, Capabilities, register_method


@dataclass(frozen=True)
class FloraNConfig(AdapterConfig):
    """Config of a FLoRA (N-dim, Tucker) adapter.

    Attributes:
        r: Tucker rank of the output- and input-channel modes (capped at ``d_out`` / ``d_in``).
        kernel_r: Tucker rank of each kernel mode of a convolution (``None``: the kernel size, i.e. no reduction).
        alpha: the update is scaled by ``alpha / r``.
    """

    r: int = 8
    kernel_r: int | None = None
    alpha: float = 8.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.r, int) and self.r >= 1, "r", self.r, "must be a positive integer")
        require(self.kernel_r is None or (isinstance(self.kernel_r, int) and self.kernel_r >= 1), "kernel_r",
                self.kernel_r, "must be None or a positive integer")
        require(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha", self.alpha, "must be > 0")


def _orthonormal(rows: int, cols: int) -> nn.Parameter:
    return nn.Parameter(nn.init.orthogonal_(torch.empty(rows, cols)))


def unit_kernel(geometry: Geometry, factor: Tensor) -> Tensor:
    """A ``(d, r)`` channel factor as the ``(d, r, 1, ...)`` weight of a 1x1 product on this layer kind."""
    ndim = geometry.ndim if isinstance(geometry, ConvGeometry) else 0
    return factor.reshape(*factor.shape, *([1] * ndim))


@register_method("flora-n", FloraNConfig)
class FloraN(Adapter):
    """``delta(x) = s U_out (K * (U_in^T x))`` with ``K`` the core's kernel ``G x_3 U_k1 ...``."""

    capabilities = Capabilities(layers=frozenset({"linear", "conv"}), factorable=True)

    def __init__(self, geometry: Geometry, config: FloraNConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        kernel = geometry.kernel_size if isinstance(geometry, ConvGeometry) else ()
        r_out, r_in = min(config.r, geometry.d_out), min(config.r, geometry.d_in)
        r_k = [min(config.kernel_r or k, k) for k in kernel]
        self.scale = config.alpha / config.r
        self.flora_core = nn.Parameter(torch.zeros(r_out, r_in, *r_k))  # G
        self.flora_out = _orthonormal(geometry.d_out, r_out)  # U_out
        self.flora_in = _orthonormal(geometry.d_in, r_in)  # U_in
        self.flora_kernel = nn.ParameterList([_orthonormal(k, rk) for k, rk in zip(kernel, r_k)])  # U_k
        w = base.weight()
        self.to(device=w.device, dtype=w.dtype)

    def core_kernel(self) -> Tensor:
        """``K = G x_3 U_k1 x_4 U_k2 ...``: ``(r_out, r_in, *kernel)`` (``G`` itself on Linear layers)."""
        k = self.flora_core
        for mode, u in enumerate(self.flora_kernel, start=2):
            k = (k.movedim(mode, -1) @ u.t()).movedim(-1, mode)
        return k

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        g = self.geometry
        x = x.to(self.flora_core.dtype)
        h = g.up(x, unit_kernel(g, self.flora_in.t()))  # (B, r_in, *spatial): U_in^T x
        h = g.down(h, self.core_kernel())  # (B, r_out, *spatial'): the core convolution
        return (g.up(h, unit_kernel(g, self.flora_out)) * self.scale).to(base_out.dtype)  # (B, d_out, *spatial')

    def _input_side(self) -> Tensor:  # (r_out, d_in, *kernel) = K x_2 U_in
        return torch.einsum("rs...,is->ri...", self.core_kernel(), self.flora_in)

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        return torch.einsum("or,ri...->oi...", self.flora_out, self._input_side()) * self.scale

    def factors(self) -> tuple[Tensor, Tensor]:
        side = self._input_side()
        return self.flora_out * self.scale, side.reshape(side.shape[0], -1)

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())
