"""RandLoRA (Albert et al., 2025; METHODS.md entry 11): full-rank updates from shared frozen random bases.

    dW = s * sum_{n=1..N} B_n Lambda_n A Gamma_n,     N = ceil(min(d_out, d_in) / r),  s = alpha / r

``B_n: (max_dim, r)`` and ``A: (r, min_dim)`` are frozen random bases shared by every layer of the adapter (one
copy per model, sliced per layer); only the diagonals ``Lambda_n`` (``randlora_lambda: (r, N)``, zero at init)
and ``Gamma_n`` (``randlora_gamma: (N, min_dim)``) are trained, ``N r + N min_dim`` numbers per layer, while the
ranks of the ``N`` terms add up to ``min(d_out, d_in)``. ``A``/``B`` sit on the smaller/larger side of the
layer, so the same bases serve ``d_in < d_out`` and ``d_in > d_out``.

The forward is two thin products through the ``N r``-wide basis, never ``dW``: the scaled small-side basis
``(Lambda_n A Gamma_n)_n`` is formed once per call by :class:`_ScaledBasis`, which (as in the paper and PEFT)
keeps only ``A``, ``Lambda``, ``Gamma`` for backward, not the ``(r, N, min_dim)`` product.

Layout, generation and scale follow PEFT's ``RandLoraConfig`` exactly (so outputs and files match PEFT):
PEFT shares one ``A`` across the ``N`` terms (``randlora_A: (r, 1, min_dim)``), draws ``B`` as ``(max_dim, N, r)``,
and pairs the flattened ``(r, N)`` rows of the scaled ``A`` with the flattened ``(N, r)`` columns of ``B``: a fixed
relabelling of the i.i.d. random basis columns, equivalent to the paper's sum. Bases are Kaiming-uniform in
bfloat16 from ``torch.Generator().manual_seed(projection_prng_key)``, divided by their std (PEFT's recipe),
sized by the elementwise-largest ``(d_out, d_in)`` of the targeted layers. ``save_projection=False`` leaves them
out of the file; they are regenerated from the seed on load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, require_rank_and_alpha
from ..errors import require
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from .base import Adapter, Capabilities, SharedState, register_method


@dataclass(frozen=True)
class RandLoraConfig(AdapterConfig):
    """Config of a RandLoRA adapter (PEFT's field meanings; ``alpha`` is PEFT's ``randlora_alpha``).

    Attributes:
        r: rank of each random basis; fewer bases, hence more trainable ``Gamma`` entries, as ``r`` grows smaller.
        alpha: the update is scaled by ``alpha / r``.
        dropout: dropout probability on the adapter's input.
        projection_prng_key: seed of the shared random bases.
        save_projection: store the bases in saved files (else regenerate them from the seed on load).
    """

    r: int = 32
    alpha: float = 640.0
    dropout: float = 0.0
    projection_prng_key: int = 0
    save_projection: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require_rank_and_alpha(self.r, self.alpha)
        require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        require(isinstance(self.projection_prng_key, int), "projection_prng_key", self.projection_prng_key,
                "must be an integer")


def num_bases(d_out: int, d_in: int, r: int) -> int:
    """``N = ceil(min(d_out, d_in) / r)``: enough rank-``r`` terms to reach full rank."""
    return -(-min(d_out, d_in) // r)


class RandLoraBases(SharedState):
    """Frozen random bases of one RandLoRA adapter: ``randlora_A: (r, 1, min_dim)``, ``randlora_B: (max_dim, N, r)``."""

    def __init__(self, config: RandLoraConfig, d_out: int, d_in: int) -> None:
        super().__init__()
        big, small, r = max(d_out, d_in), min(d_out, d_in), config.r
        gen = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)

        def draw(*shape: int) -> Tensor:
            return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=gen)

        a = draw(r, 1, small)
        b = torch.cat([draw(big, 1, r) for _ in range(num_bases(d_out, d_in, r))], dim=1)
        self.register_buffer("randlora_A", a / a.std(), persistent=config.save_projection)
        self.register_buffer("randlora_B", b / b.std(), persistent=config.save_projection)


class _ScaledBasis(torch.autograd.Function):
    """``lam[:, :, None] * A * gam[None]`` saving only its inputs (not the ``(r, N, min_dim)`` result)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, lam: Tensor, gam: Tensor) -> Tensor:  # a: (r, 1, m), lam: (r, N), gam: (N, m)
        ctx.save_for_backward(a, lam, gam)
        return lam[:, :, None] * a * gam[None]  # (r, N, m)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, Tensor]:
        a, lam, gam = ctx.saved_tensors
        grad_lam = torch.einsum("knj,kvj,nj->kn", grad, a.to(grad.dtype), gam.to(grad.dtype))
        grad_gam = torch.einsum("knj,kvj,kn->nj", grad, a.to(grad.dtype), lam.to(grad.dtype))
        return None, grad_lam, grad_gam


@register_method("randlora", RandLoraConfig)
class RandLora(Adapter):
    """``delta(x) = s * B_flat (A_scaled x)`` (or the transposed pairing when ``d_out < d_in``)."""

    capabilities = Capabilities(layers=frozenset({"linear"}))

    @classmethod
    def shared_state(cls, config: AdapterConfig, geometries: list[Geometry]) -> RandLoraBases:
        assert isinstance(config, RandLoraConfig)
        return RandLoraBases(config, max(g.d_out for g in geometries), max(g.d_in for g in geometries))

    def __init__(self, geometry: Geometry, config: RandLoraConfig, base: Backend, *,
                 shared: RandLoraBases) -> None:
        super().__init__(geometry, config, base)
        self.hold_shared(shared)
        self.small, self.big = min(geometry.d_in, geometry.d_out), max(geometry.d_in, geometry.d_out)
        self.n = num_bases(geometry.d_out, geometry.d_in, config.r)
        self.scale = config.alpha / config.r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        w = base.weight()
        self.randlora_lambda = nn.Parameter(torch.zeros(config.r, self.n, device=w.device, dtype=w.dtype))
        self.randlora_gamma = nn.Parameter(torch.full((self.n, self.small), 1 / max(self.n, self.small),
                                                      device=w.device, dtype=w.dtype))

    def bases(self) -> tuple[Tensor, Tensor]:
        """``(A_scaled: (r N, small), B_flat: (big, N r))``, this layer's slices of the shared bases."""
        a = self.shared.randlora_A[:, :, : self.small].to(self.randlora_gamma.dtype)
        b = self.shared.randlora_B[: self.big, : self.n, :].to(self.randlora_gamma.dtype)
        return _ScaledBasis.apply(a, self.randlora_lambda, self.randlora_gamma).flatten(0, 1), b.flatten(1)

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        a, b = self.bases()
        x = self.dropout(x.to(a.dtype))
        if self.geometry.d_in == self.small:
            out = F.linear(F.linear(x, a), b)  # (..., r N) -> (..., d_out)
        else:
            out = F.linear(F.linear(x, b.t()), a.t())  # (..., N r) -> (..., d_out)
        return (out * self.scale).to(base_out.dtype)

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        a, b = self.bases()
        delta = b @ a if self.geometry.d_in == self.small else a.t() @ b.t()
        return delta * self.scale  # (d_out, d_in)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {"randlora_lambda": self.randlora_lambda, "randlora_gamma": self.randlora_gamma}
