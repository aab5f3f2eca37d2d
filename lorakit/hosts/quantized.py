"""The quantised base backend (QLoRA, Dettmers et al., 2023, METHODS.md entry 39) and the backend factory.

    Y = X dequant(W_q)^T + sum of the adapters' contributions        (QLoRA eq. 5, in the input's dtype)

The host layer's base module is a frozen quantised ``nn.Linear`` made by a codec (:mod:`lorakit.hosts.codecs`:
torchao NF4, bitsandbytes NF4/FP4, lorakit k-bit); its own forward runs the library's kernel. Methods see the same
API as on a dense base: ``weight()`` is the *dequantised* weight (computed on every call, never cached, so the
memory stays 4-bit), and ``set_weight`` requantises (merging into a quantised base: dequantise, add, requantise).
Requantising rounds; the relative error ``||Q(W) - W||_F / ||W||_F`` of the last write is kept in
``last_rounding_error`` and logged, and :func:`lorakit.quant.rounding_errors` collects it model-wide.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .backend import Backend, DenseBackend
from .codecs import Codec, codec_of

log = logging.getLogger(__name__)


class QuantizedBackend:
    """A frozen weight stored by ``codec`` in ``module`` (an ``nn.Linear``-like quantised layer)."""

    supports_merge = True
    quantized = True
    materialized = False  # weight() dequantises into a fresh tensor on every call

    def __init__(self, module: nn.Module, codec: Codec) -> None:
        self.module = module
        self.codec = codec
        self.last_rounding_error: float | None = None
        self._writes = 0
        self._undo: tuple[dict[str, Tensor], float] | None = None  # what the last write replaced, its tolerance

    def weight(self) -> Tensor:
        """The dequantised weight ``(d_out, d_in)`` in the compute dtype (a fresh tensor)."""
        return self.codec.dequantize(self.module)

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None)

    @torch.no_grad()
    def set_weight(self, weight: Tensor) -> None:
        """Requantise ``weight`` (canonical layout) into the module and record the rounding error.

        A write that lands within the previous write's rounding error of the weight stored before it (unmerging what
        was just merged: ``Q(W0 + D) - D`` is ``||Q(W0 + D) - (W0 + D)||`` from ``W0``) restores the codes stored
        before that write bit-exactly instead of rounding a second time.
        """
        target = weight.detach().float()
        undo, self._undo = self._undo, None
        written = self._stored()
        if undo is not None:
            self._load(undo[0])
            if torch.linalg.norm(self.weight().float() - target) <= undo[1]:
                self._record(target)
                return
            self._load(written)
        self.codec.requantize(self.module, weight)
        error = self._record(target)
        self._undo = (written, 1.01 * error * torch.linalg.norm(target).item() + 1e-6)

    def _record(self, target: Tensor) -> float:
        stored = self.weight().float()
        norm = torch.linalg.norm(target).clamp_min(1e-30)
        self.last_rounding_error = (torch.linalg.norm(stored - target) / norm).item()
        self._writes += 1
        log.info("requantised a %s weight: relative rounding error %.3g", tuple(target.shape), self.last_rounding_error)
        return self.last_rounding_error

    def _stored(self) -> dict[str, Tensor]:
        """The module's tensors that store the weight (every requantisation replaces them, never mutates them)."""
        own = [*self.module.named_parameters(recurse=False), *self.module.named_buffers(recurse=False)]
        return {name: t for name, t in own if name != "bias"}

    def _load(self, stored: dict[str, Tensor]) -> None:
        for name, t in stored.items():
            setattr(self.module, name, t)

    @torch.no_grad()
    def set_bias(self, bias: Tensor) -> None:
        self.module.bias.copy_(bias.to(self.module.bias.dtype))

    def version(self) -> tuple[int, int]:
        """Changes whenever :meth:`set_weight` stores a new weight (a key for caches derived from it)."""
        return (id(self.module), self._writes)

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


def backend_for(module: nn.Module) -> Backend:
    """The backend of a host layer's base module: quantised when a codec made it, else dense."""
    codec = codec_of(module)
    return DenseBackend(module) if codec is None else QuantizedBackend(module, codec)
