"""Base backends: how a host layer stores and applies its frozen weight.

The dense backend wraps the original module. Quantized backends (NF4, low-rank + quantized, ...) implement
the same small :class:`Backend` protocol so that every method composes with every backend; methods read what differs
from the protocol's attributes, never from the backend's type.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from .geometry import is_transposed


class Backend(Protocol):
    """How a host layer's frozen weight is stored and applied.

    Attributes:
        module: the base module (its forward applies the frozen weight).
        supports_merge: adapters may be folded into the stored weight (``set_weight``).
        quantized: the stored weight is quantised: ``set_weight`` rounds.
        materialized: ``weight()`` is the stored tensor itself (not a fresh dequantised copy), so a fused kernel may
            read it without keeping a full-precision copy alive for backward.
    """

    module: nn.Module
    supports_merge: bool
    quantized: bool
    materialized: bool

    def weight(self) -> Tensor:
        """The weight in the canonical layout of :mod:`.geometry` (``(d_out, d_in, ...)``)."""

    @property
    def bias(self) -> Tensor | None: ...

    def set_weight(self, weight: Tensor) -> None:
        """Store ``weight`` (canonical layout)."""

    def set_bias(self, bias: Tensor) -> None: ...

    def version(self) -> tuple[int, int]:
        """Changes whenever the stored weight changes: a key for caches derived from it."""

    def forward(self, x: Tensor) -> Tensor: ...


class DenseBackend:
    """The original, unquantized layer. ``weight()`` is in the canonical layout of :mod:`.geometry`."""

    supports_merge = True
    quantized = False
    materialized = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._transposed = is_transposed(module)

    def weight(self) -> Tensor:
        w = self.module.weight
        return w.t() if self._transposed else w

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None)

    @torch.no_grad()
    def set_weight(self, weight: Tensor) -> None:
        """Overwrite the frozen weight in place (canonical layout)."""
        self.weight().copy_(weight.to(self.module.weight.dtype))

    @torch.no_grad()
    def set_bias(self, bias: Tensor) -> None:
        self.module.bias.copy_(bias.to(self.module.bias.dtype))

    def version(self) -> tuple[int, int]:
        """Changes whenever the weight changes in place: a key for caches derived from the weight."""
        w = self.module.weight
        return (w.data_ptr(), w._version)

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)
