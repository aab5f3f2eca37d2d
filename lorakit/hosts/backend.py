"""Base backends: how a host layer stores and applies its frozen weight.

The dense backend wraps the original module. Quantized backends (NF4, low-rank + quantized, ...) implement
the same small API so that every method composes with every backend.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .geometry import is_transposed


class DenseBackend:
    """The original, unquantized layer. ``weight()`` is in the canonical layout of :mod:`.geometry`."""

    supports_merge = True
    quantized = False

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
