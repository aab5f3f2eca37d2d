"""How a low-rank update enters each kind of base layer.

A :class:`Geometry` hides the layer type from the methods: it knows the shapes of the down (``A``) and up
(``B``) factors, how to apply them to an input, and how to compose them into a dense update in the base
weight's canonical layout. Canonical layouts: Linear / GPT-2 Conv1D ``(d_out, d_in)``; ConvNd
``(d_out, d_in, *kernel)``; Embedding ``(num_embeddings, dim)`` (the embedding table itself).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TargetError

_CONV_FN: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class Geometry:
    """Shapes and products shared by every factorised method; subclasses per layer kind."""

    kind: str  # "linear" | "conv" | "embedding"
    d_in: int
    d_out: int

    def down_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.d_in)

    def up_shape(self, r: int) -> tuple[int, ...]:
        return (self.d_out, r)

    def down(self, x: Tensor, a: Tensor) -> Tensor:
        return F.linear(x, a)  # (..., r)

    def up(self, h: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.linear(h, b, bias)  # (..., d_out)

    def compose(self, b: Tensor, a: Tensor) -> Tensor:
        """``B @ A`` in the base weight's canonical layout."""
        return b @ a

    def matrix(self, weight: Tensor) -> Tensor:
        """A canonical weight (or factor) viewed as a 2-D matrix with one row per output unit."""
        return weight

    def factored(self, b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """``(B_eff, A_eff)`` with ``B_eff @ A_eff`` = :meth:`compose` ``(b, a)`` as a 2-D matrix (one row per row of
        the canonical weight); explicit sizes, so a rank-0 layer gives empty factors."""
        r = a.shape[0]
        return b.reshape(b.shape[0], r), a.reshape(r, math.prod(a.shape[1:]))

    def channel(self, v: Tensor) -> Tensor:
        """A per-output-unit vector shaped to broadcast against this layer's output."""
        return v


@dataclass(frozen=True)
class LinearGeometry(Geometry):
    pass


@dataclass(frozen=True)
class ConvGeometry(Geometry):
    ndim: int = 2
    kernel_size: tuple[int, ...] = (1, 1)
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] | str = (0, 0)
    dilation: tuple[int, ...] = (1, 1)

    def down_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.d_in, *self.kernel_size)

    def up_shape(self, r: int) -> tuple[int, ...]:
        return (self.d_out, r, *([1] * self.ndim))

    def down(self, x: Tensor, a: Tensor) -> Tensor:
        return _CONV_FN[self.ndim](x, a, None, self.stride, self.padding, self.dilation)  # (B, r, *spatial)

    def up(self, h: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
        return _CONV_FN[self.ndim](h, b, bias)  # (B, d_out, *spatial)

    def compose(self, b: Tensor, a: Tensor) -> Tensor:
        r = a.shape[0]
        return (b.reshape(self.d_out, r) @ a.reshape(r, -1)).reshape(self.d_out, self.d_in, *self.kernel_size)

    def matrix(self, weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)

    def channel(self, v: Tensor) -> Tensor:
        return v.reshape(1, -1, *([1] * self.ndim))


@dataclass(frozen=True)
class EmbeddingGeometry(Geometry):
    """``A`` is ``(r, num_embeddings)`` (looked up by token id), ``B`` is ``(dim, r)``, as in PEFT."""

    padding_idx: int | None = None

    def down(self, x: Tensor, a: Tensor) -> Tensor:
        return F.embedding(x, a.t(), padding_idx=self.padding_idx)  # (..., r)

    def compose(self, b: Tensor, a: Tensor) -> Tensor:
        return (b @ a).t()  # (num_embeddings, dim)

    def factored(self, b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        return a.t(), b.t()  # canonical delta (num_embeddings, dim) = A^T @ B^T

    def matrix(self, weight: Tensor) -> Tensor:
        raise TargetError("embedding layers have no per-output-unit weight matrix (DoRA-style methods do not apply)")


def _conv1d_gpt2_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep the core importable without it
        return None
    return Conv1D


def geometry_of(module: nn.Module) -> Geometry:
    """The geometry of a supported base layer, or a :class:`TargetError` naming the supported types."""
    if isinstance(module, nn.Linear):
        return LinearGeometry("linear", module.in_features, module.out_features)
    gpt2_conv = _conv1d_gpt2_type()
    if gpt2_conv is not None and isinstance(module, gpt2_conv):
        d_in, d_out = module.weight.shape
        return LinearGeometry("linear", d_in, d_out)
    if isinstance(module, nn.Embedding):
        return EmbeddingGeometry("embedding", module.num_embeddings, module.embedding_dim, module.padding_idx)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise TargetError(
                f"{type(module).__name__} with groups={module.groups}, padding_mode={module.padding_mode!r} "
                "is not supported; adapters need groups=1 and padding_mode='zeros'"
            )
        ndim = len(module.kernel_size)
        return ConvGeometry(
            "conv", module.in_channels, module.out_channels, ndim, tuple(module.kernel_size),
            tuple(module.stride), module.padding, tuple(module.dilation),
        )
    raise TargetError(f"cannot adapt a {type(module).__name__}; supported: {', '.join(SUPPORTED_LAYERS)}")


SUPPORTED_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "transformers Conv1D")


def is_supported(module: nn.Module) -> bool:
    gpt2_conv = _conv1d_gpt2_type()
    types: tuple[type, ...] = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if gpt2_conv is not None:
        types = types + (gpt2_conv,)
    return isinstance(module, types)


def is_linear_like(module: nn.Module) -> bool:
    """Linear or GPT-2 Conv1D: what ``"all-linear"`` selects."""
    gpt2_conv = _conv1d_gpt2_type()
    return isinstance(module, nn.Linear) or (gpt2_conv is not None and isinstance(module, gpt2_conv))


def is_transposed(module: nn.Module) -> bool:
    """True for GPT-2's Conv1D, which stores its weight as ``(d_in, d_out)``."""
    gpt2_conv = _conv1d_gpt2_type()
    return gpt2_conv is not None and isinstance(module, gpt2_conv)


def per_unit(v: Tensor, like: Tensor) -> Tensor:
    """A per-output-unit vector shaped to scale the rows of a canonical weight like ``like``."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def mix_units(m: Tensor, weight: Tensor) -> Tensor:
    """``m @ W`` over the output units (rows) of a canonical Linear/Conv weight; ``m`` is ``(d_out, d_out)``."""
    return (m.to(weight.dtype) @ weight.reshape(weight.shape[0], -1)).reshape(weight.shape)
