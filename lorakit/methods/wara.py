"""WaRA (Heidari et al., 2025; METHODS.md entry 4): low-rank adaptation in the wavelet domain.

    dW = s * IDWT2(Z) = s * H_out^T Z H_in,      Z = [[B_LL A_LL, B_LH A_LH], [B_HL A_HL, B_HH A_HH]],   s = alpha / r

``H`` is the orthonormal one-level Haar analysis matrix (approximation rows ``(v_2i + v_2i+1) / sqrt 2``, then detail
rows ``(v_2i - v_2i+1) / sqrt 2``), so ``IDWT2(DWT2(M)) = M``. Each of the four sub-bands of the coefficient matrix
``Z`` is a rank-``r`` product (``A: (r, d_in / 2)``, ``B: (d_out / 2, r)``), so ``dW`` reaches rank ``4 r`` while
LoRA's stays ``r``; the ``B`` start at zero, so ``dW = 0`` at init.

Applied in the wavelet domain, never forming ``dW``: the input's Haar transform ``H_in x`` (pairwise sums and
differences), the sub-band products, and the inverse Haar transform of the output coefficients, ``O(r (d_in + d_out))``
per token. ``dW = (s H_out^T B_big)(A_big H_in)`` is exactly rank ``<= 4 r``, so :meth:`Wara.factors` is exact.

Assumed (the abstract gives neither wavelet family, levels, nor how sub-bands are factorised): Haar, one level, one
rank-``r`` factorisation per sub-band; ``d_in`` and ``d_out`` must be even; Linear layers only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, require_rank_and_alpha
from ..errors import require
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from .base import Adapter, Capabilities, register_method

_ROOT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class WaraConfig(AdapterConfig):
    """Config of a WaRA adapter.

    Attributes:
        r: rank of each of the four wavelet sub-band factorisations (the update has rank up to ``4 r``).
        alpha: the update is scaled by ``alpha / r``.
    """

    r: int = 8
    alpha: float = 8.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_rank_and_alpha(self.r, self.alpha)


def haar(v: Tensor) -> Tensor:
    """One-level orthonormal Haar analysis of the last axis: ``(..., d) -> (..., 2, d / 2)`` (approximation, detail)."""
    even, odd = v[..., 0::2], v[..., 1::2]
    return torch.stack(((even + odd) / _ROOT2, (even - odd) / _ROOT2), dim=-2)


def inverse_haar(bands: Tensor) -> Tensor:
    """Inverse of :func:`haar`: ``(..., 2, d / 2) -> (..., d)``."""
    low, high = bands[..., 0, :], bands[..., 1, :]
    return torch.stack(((low + high) / _ROOT2, (low - high) / _ROOT2), dim=-1).flatten(-2)


@register_method("wara", WaraConfig)
class Wara(Adapter):
    """``delta(x) = s IDWT_out(Z DWT_in(x))`` with ``Z`` one rank-``r`` product per sub-band."""

    capabilities = Capabilities(layers=frozenset({"linear"}), factorable=True)

    def __init__(self, geometry: Geometry, config: WaraConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        for name, d in (("d_in", geometry.d_in), ("d_out", geometry.d_out)):
            require(d % 2 == 0, "targets", config.targets, f"must select layers with even {name} for the Haar "
                    f"transform (a layer has {name}={d})")
        r, half_in, half_out = config.r, geometry.d_in // 2, geometry.d_out // 2
        self.scale = config.alpha / r
        self.wara_A = nn.Parameter(torch.empty(2, 2, r, half_in))  # [out band, in band]: (r, d_in / 2)
        self.wara_B = nn.Parameter(torch.zeros(2, 2, half_out, r))  # [out band, in band]: (d_out / 2, r)
        for block in self.wara_A.data.view(4, r, half_in):
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        w = base.weight()
        self.to(device=w.device, dtype=w.dtype)

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        bands = haar(x.to(self.wara_A.dtype))  # (..., 2 in-bands, d_in / 2)
        h = torch.einsum("...ci,ocri->...ocr", bands, self.wara_A)  # (..., 2, 2, r)
        z = torch.einsum("...ocr,ocjr->...oj", h, self.wara_B)  # (..., 2 out-bands, d_out / 2)
        return (inverse_haar(z) * self.scale).to(base_out.dtype)  # (..., d_out)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``s H_out^T B_big: (d_out, 4r)`` and ``A_big H_in: (4r, d_in)`` (block-sparse ``B_big``, ``A_big``)."""
        r = self.config.r
        eye2 = torch.eye(2, dtype=self.wara_B.dtype, device=self.wara_B.device)
        # B_big[(o', j), (o, c, k)] = [o' = o] B[o, c, j, k];  A_big[(o, c, k), (c', i)] = [c' = c] A[o, c, k, i]
        b_big = torch.einsum("pq,qcjk->pjqck", eye2, self.wara_B)  # (2, d_out / 2, 2, 2, r)
        a_big = torch.einsum("ocki,cd->ockdi", self.wara_A, eye2)  # (2, 2, r, 2, d_in / 2)
        b_eff = inverse_haar(b_big.reshape(2, -1, 4 * r).movedim(2, 0)).t()  # (d_out, 4r)
        a_eff = inverse_haar(a_big.reshape(4 * r, 2, -1))  # (4r, d_in)
        return b_eff * self.scale, a_eff

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        b, a = self.factors()
        return b @ a

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())
