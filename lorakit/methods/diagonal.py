"""Frozen decomposed bases with a trainable diagonal: ``delta = B diag(d - d0) A`` (SVFit, LoLDU).

A subclass decomposes the base weight (factor layout, :mod:`lorakit.init.layout`) into ``B (rows, r)``,
``d0 (r,)``, ``A (r, cols)`` with ``B diag(d0) A`` its rank-``r`` part, keeps ``B`` and ``A`` as frozen buffers
and trains a parametrisation of the diagonal ``d`` that starts at ``d0``. Writing the update relative to ``d0``
is the same model as the papers' ``W_res + B diag(d) A`` with ``W_res = W - B diag(d0) A``, without rewriting the
base: identity at init is exact and unmerging restores the original weight.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import AdapterConfig
from ..hosts.backend import Backend
from ..hosts.geometry import Geometry
from ..init.layout import base_matrix
from .base import Adapter, Capabilities


class FrozenBasesDiagonal(Adapter):
    """``h = W0 x + B diag(diagonal()) A x`` with frozen ``lora_B``/``lora_A`` buffers."""

    capabilities = Capabilities(factorable=True)

    def __init__(self, geometry: Geometry, config: AdapterConfig, base: Backend) -> None:
        super().__init__(geometry, config, base)
        b, d0, a = self.decompose(base_matrix(geometry, base))  # (rows, r), (r,), (r, cols)
        dtype = base.weight().dtype if base.weight().is_floating_point() else torch.float32
        r = d0.shape[0]
        self.register_buffer("lora_B", b.reshape(geometry.up_shape(r)).to(dtype).contiguous())
        self.register_buffer("lora_A", a.reshape(geometry.down_shape(r)).to(dtype).contiguous())
        self.init_diagonal(d0.to(dtype))

    def decompose(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, d0, A)`` of the float32 weight ``w`` (``(rows, cols)``)."""
        raise NotImplementedError

    def init_diagonal(self, d0: Tensor) -> None:
        """Create the trainable tensors (and frozen buffers) so that :meth:`diagonal` starts at zero."""
        raise NotImplementedError

    def diagonal(self) -> Tensor:
        """``d - d0``, ``(r,)``."""
        raise NotImplementedError

    def forward(self, x: Tensor, base_out: Tensor, base: Backend) -> Tensor:
        if x.is_floating_point():  # embeddings take token ids
            x = x.to(self.lora_A.dtype)
        h = self.geometry.down(x, self.lora_A)  # (..., r)
        h = h * self.geometry.channel(self.diagonal())
        return self.geometry.up(h, self.lora_B).to(base_out.dtype)  # (..., d_out)

    def _b_eff(self) -> Tensor:  # (rows, r): B diag(d - d0)
        return self.lora_B.reshape(self.lora_B.shape[0], -1) * self.diagonal()

    def merge_delta(self, unit_scale: Tensor | None) -> Tensor:
        return self.geometry.compose(self._b_eff().reshape(self.lora_B.shape), self.lora_A)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.geometry.factored(self._b_eff(), self.lora_A)
