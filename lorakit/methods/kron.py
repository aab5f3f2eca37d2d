"""Kronecker adapter: DiffuseKronA (Marjit et al., 2024; METHODS.md entry 3) in LoKr's parametrisation.

    dW = s * (W1 kron W2),    W1: (a1, a2),  W2: (b1, b2[, *kernel]),  a1 * b1 = d_out,  a2 * b2 = d_in,  s = alpha / r

applied without forming dW: with ``x`` of one token reshaped to ``X: (a2, b2)``,
``(W1 kron W2) vec(X) = vec(W1 X W2^T)`` (paper eq. for the Kronecker matvec), so the layer computes
``W2`` on the ``a2`` input chunks (a ``(b2 -> b1)`` linear or convolution) and mixes the chunks with ``W1``.

Shapes follow PEFT's LoKr (the interop peer) exactly, so files and outputs match PEFT:
- ``(a1, b1) = factorization(d_out, decompose_factor)``, ``(a2, b2) = factorization(d_in, decompose_factor)``;
- ``W2`` is a full ``lokr_w2`` unless ``r < max(b1, b2) / 2``, then ``lokr_w2_a @ lokr_w2_b`` with rank ``r``;
- ``W1`` is a full ``lokr_w1`` unless ``decompose_both`` and ``r < max(a1, a2) / 2``.
On convolutions the kernel belongs to ``W2`` (``kron(W1[..., None, None], W2)``), as in PEFT.

Assumed (DiffuseKronA does not fix it; METHODS.md says "verify"): ``W1`` starts at zero and ``W2`` is
Kaiming-uniform, so ``dW = 0`` at init (PEFT's default; ``init="lycoris"`` zeroes ``W2`` instead). The scale
``alpha / r`` is LoKr's convention; DiffuseKronA's "scale hyper-parameter" is ``alpha`` here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, require_rank_and_alpha
from ..errors import require
from ..hosts.backend import Backend
from ..hosts.geometry import ConvGeometry, Geometry
from .base import Adapter, Capabilities, register_method

KRON_INITS = ("default", "lycoris", "random")


@dataclass(frozen=True)
class KronConfig(AdapterConfig):
    """Config of a Kronecker (DiffuseKronA / LoKr) adapter; field names follow PEFT's ``LoKrConfig``.

    Attributes:
        r: rank of the low-rank factorisation of a factor that is decomposed (see the module docstring).
        alpha: the update is scaled by ``alpha / r``.
        decompose_factor: the size the smaller Kronecker factor's sides aim for (``-1``: near ``sqrt(d)``).
        decompose_both: also factorise ``W1`` as a rank-``r`` product when ``r`` is small enough.
        init: ``"default"`` (``W1 = 0``), ``"lycoris"`` (``W2 = 0``) or ``"random"`` (not identity at init).
    """

    r: int = 8
    alpha: float = 8.0
    decompose_factor: int = -1
    decompose_both: bool = False
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_rank_and_alpha(self.r, self.alpha)
        require(isinstance(self.decompose_factor, int) and (self.decompose_factor == -1 or self.decompose_factor >= 1),
                "decompose_factor", self.decompose_factor, "must be -1 or a positive integer")
        require(self.init in KRON_INITS, "init", self.init, f"must be one of {', '.join(KRON_INITS)}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n = dimension``, ``m <= n``, ``m`` as close to ``factor`` (or ``sqrt``) as divisors allow.

    PEFT's / LyCORIS's rule, reproduced so the factor shapes (and thus the files) agree with theirs.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _kaiming(t: Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


@register_method("kron", KronConfig)
class Kron(Adapter):
    """``delta(x) = s * (W1 kron W2) x`` as ``s * W1 X W2^T`` on the input reshaped to ``(a2, b2)`` chunks."""

    capabilities = Capabilities(layers=frozenset({"linear", "conv"}))

    def __init__(self, geometry: Geometry, config: KronConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        r, f = config.r, config.decompose_factor
        (self.a1, self.b1), (self.a2, self.b2) = factorization(geometry.d_out, f), factorization(geometry.d_in, f)
        self.kernel = geometry.kernel_size if isinstance(geometry, ConvGeometry) else ()
        self.scale = config.alpha / r
        if config.decompose_both and r < max(self.a1, self.a2) / 2:
            self.lokr_w1_a = nn.Parameter(torch.empty(self.a1, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, self.a2))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(self.a1, self.a2))
        if r < max(self.b1, self.b2) / 2:
            self.lokr_w2_a = nn.Parameter(torch.empty(self.b1, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, self.b2 * math.prod(self.kernel)))
        else:
            self.lokr_w2 = nn.Parameter(torch.empty(self.b1, self.b2, *self.kernel))
        self.reset(config.init)
        w = base.weight()
        self.to(device=w.device, dtype=w.dtype)

    @torch.no_grad()
    def reset(self, init: str) -> None:
        """PEFT's LoKr initialisations: one Kronecker factor zero (``default``: ``W1``, ``lycoris``: ``W2``)."""
        for p in self.parameters():
            _kaiming(p)
        if init == "default":
            nn.init.zeros_(self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a)
        elif init == "lycoris":
            nn.init.zeros_(self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_b)

    def w1(self) -> Tensor:  # (a1, a2)
        return self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b

    def w2(self) -> Tensor:  # (b1, b2, *kernel)
        if hasattr(self, "lokr_w2"):
            return self.lokr_w2
        return (self.lokr_w2_a @ self.lokr_w2_b).reshape(self.b1, self.b2, *self.kernel)

    def _apply_w2(self, chunks: Tensor) -> Tensor:
        """``W2`` on input chunks of ``b2`` features/channels: ``(..., b2) -> (..., b1)`` (channels first on conv)."""
        g = self.geometry
        if hasattr(self, "lokr_w2"):
            return g.down(chunks, self.lokr_w2)
        r = self.config.r
        h = g.down(chunks, self.lokr_w2_b.reshape(r, self.b2, *self.kernel))  # rank-r middle
        return g.up(h, self.lokr_w2_a.reshape(self.b1, r, *([1] * len(self.kernel))))

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        x = x.to(self.w1().dtype)
        if self.kernel:  # x: (B, d_in, *spatial)
            n = x.shape[0]
            h = self._apply_w2(x.reshape(n * self.a2, self.b2, *x.shape[2:]))  # (B a2, b1, *spatial')
            h = h.reshape(n, self.a2, self.b1, *h.shape[2:])  # (B, a2, b1, *spatial')
            y = torch.einsum("njp...,ij->nip...", h, self.w1())  # (B, a1, b1, *spatial')
            out = y.reshape(n, self.geometry.d_out, *y.shape[3:])  # (B, d_out, *spatial')
        else:  # x: (..., d_in)
            h = self._apply_w2(x.reshape(*x.shape[:-1], self.a2, self.b2))  # (..., a2, b1)
            y = torch.einsum("...jp,ij->...ip", h, self.w1())  # (..., a1, b1)
            out = y.reshape(*x.shape[:-1], self.geometry.d_out)  # (..., d_out)
        return (out * self.scale).to(base_out.dtype)

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        w1 = self.w1().reshape(self.a1, self.a2, *([1] * len(self.kernel)))
        return torch.kron(w1, self.w2()) * self.scale  # (d_out, d_in, *kernel)

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())
