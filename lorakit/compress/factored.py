"""A dense linear layer stored as two smaller ones: ``W ~ U V`` (LORD, METHODS.md entry 67; Greenformers' Low-Rank
Transformer, entry 68).

``FactoredLinear`` holds ``down`` (``V``, ``(k, d_in)``, no bias) and ``up`` (``U``, ``(d_out, k)``, the original
bias) as two plain ``nn.Linear`` and computes ``y = U (V x) + b``: two dense GEMMs, ``k (d_in + d_out)`` multiply-adds
per token instead of ``d_in d_out``, fewer exactly when ``k < d_in d_out / (d_in + d_out)`` (:func:`break_even`). Both
factors train like any Linear (LRT trains in factored form), and because they *are* ``nn.Linear``, lorakit's adapters,
quantisation and targeting (``targets="all-linear"``) reach them with no special case.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import require


def break_even(d_in: int, d_out: int) -> float:
    """The rank below which ``k (d_in + d_out) < d_in d_out``: factoring saves parameters and multiply-adds."""
    return d_in * d_out / (d_in + d_out)


class FactoredLinear(nn.Module):
    """``y = up(down(x))``: ``down`` ``(k, d_in)``, ``up`` ``(d_out, k)`` with the layer's bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
        self.in_features, self.out_features, self.rank, self.has_bias = in_features, out_features, rank, bias
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))  # (..., d_in) -> (..., k) -> (..., d_out)

    @property
    def num_parameters(self) -> int:
        """``k (d_in + d_out)`` (+ ``d_out`` for the bias), from the shapes (an adapter on a factor adds none)."""
        return self.rank * (self.in_features + self.out_features) + (self.out_features if self.has_bias else 0)

    @classmethod
    def from_factors(cls, up: Tensor, down: Tensor, bias: Tensor | None = None) -> FactoredLinear:
        """The layer computing ``up @ down @ x + bias``: ``up`` ``(d_out, k)``, ``down`` ``(k, d_in)``, in ``up``'s
        dtype and device."""
        require(up.dim() == 2 and down.dim() == 2 and up.shape[1] == down.shape[0], "factors",
                (tuple(up.shape), tuple(down.shape)), "must be (d_out, k) and (k, d_in) matrices")
        require(bias is None or tuple(bias.shape) == (up.shape[0],), "bias", None if bias is None else
                tuple(bias.shape), f"must be a ({up.shape[0]},) vector or None")
        layer = cls(down.shape[1], up.shape[0], up.shape[1], bias is not None, up.device, up.dtype)
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None, energy: float | None = None,
                    method: str = "svd", stats: Any = None) -> FactoredLinear:
        """``decompose(linear, rank, energy, method, stats)``: see :func:`lorakit.compress.decompose.decompose`."""
        from .decompose import decompose  # decompose builds this class, so it imports this module

        return decompose(linear, rank, energy, method, stats)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The dense ``nn.Linear`` with ``W = U V`` (and the bias), in the factors' dtype and device."""
        require(isinstance(self.up, nn.Linear) and isinstance(self.down, nn.Linear), "layer", type(self.up).__name__,
                "has adapters on its factors; merge and unload them (lorakit.unload) before densifying")
        up = self.up.weight
        linear = nn.Linear(self.in_features, self.out_features, self.has_bias, device=up.device, dtype=up.dtype)
        linear.weight.copy_(up @ self.down.weight)  # (d_out, k) @ (k, d_in)
        if self.up.bias is not None:
            linear.bias.copy_(self.up.bias)
        linear.requires_grad_(up.requires_grad)
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
