"""lorakit's own k-bit blockwise codebook quantiser, for the bit widths the libraries lack (2, 3 and 8 bits).

QLoRA's recipe (Dettmers et al., 2023, METHODS.md entry 39) generalised to ``k`` bits: each block of ``block``
consecutive values (row-major) is divided by its absolute maximum and rounded to the nearest level of a codebook
in ``[-1, 1]``:

* ``"nf{k}"``: k-bit NormalFloat, ``2**(k-1)`` positive and ``2**(k-1) - 1`` negative quantiles of N(0, 1) plus an
  exact zero, normalised to [-1, 1], with QLoRA's offset ``1 - (1/(2(2^k - 1)) + 1/2^(k+1)) / 2`` (0.9677 for
  k = 4, which reproduces the NF4 table). LQ-LoRA (entry 40) and INT2.1 (entry 41) use NF2/NF3 bases.
* ``"int{k}"``: ``2**k`` evenly spaced levels in [-1, 1] (absmax "uniform" quantisation, LoftQ's other option).

Storage: the k-bit codes packed densely into ``uint8`` and one float16 absmax per block (no double
quantisation: ``k + 16 / block`` bits per parameter). Normalising by the *stored*
float16 absmax makes the quantiser idempotent: ``quantize(dequantize(q)) == q``.
"""
from __future__ import annotations

import functools
import re

import torch
from torch import Tensor, nn

from ..errors import require

SCHEMES = ("nf2", "nf3", "nf4", "int2", "int3", "int4", "int8")


def parse_scheme(scheme: str) -> tuple[str, int]:
    """``"nf3"`` -> ``("nf", 3)``; a clear error for anything else."""
    match = re.fullmatch(r"(nf|int)([2-8])", scheme) if isinstance(scheme, str) else None
    require(match is not None and scheme in SCHEMES, "scheme", scheme, f"must be one of {', '.join(SCHEMES)}")
    return match.group(1), int(match.group(2))


def levels(scheme: str) -> Tensor:
    """The codebook of ``scheme`` in [-1, 1], ascending, float32 (a fresh copy)."""
    return _levels(scheme).clone()


@functools.lru_cache(maxsize=None)
def _levels(scheme: str) -> Tensor:
    family, bits = parse_scheme(scheme)
    if family == "int":
        return torch.linspace(-1.0, 1.0, 2**bits)
    offset = 1 - (1 / (2 * (2**bits - 1)) + 1 / 2 ** (bits + 1)) / 2
    normal = torch.distributions.Normal(0.0, 1.0)
    half = 2 ** (bits - 1)
    pos = normal.icdf(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])  # (half,)
    neg = -normal.icdf(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])  # (half - 1,)
    code = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (code / code.abs().max()).float()


def _pack(idx: Tensor, bits: int) -> Tensor:
    """``k``-bit codes packed densely into ``uint8``: every 8 codes (``8k`` bits) become ``k`` bytes."""
    groups = torch.cat([idx, idx.new_zeros((-idx.numel()) % 8)]).reshape(-1, 8)  # (n_groups, 8)
    word = (groups << (torch.arange(8, device=idx.device) * bits)).sum(dim=1, keepdim=True)  # (n_groups, 1), 8k bits
    return ((word >> (torch.arange(bits, device=idx.device) * 8)) & 255).to(torch.uint8).reshape(-1)


def _unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """The first ``n`` codes of :func:`_pack`'s output, as ``int64``."""
    parts = packed.long().reshape(-1, bits)  # (n_groups, k) bytes
    word = (parts << (torch.arange(bits, device=packed.device) * 8)).sum(dim=1, keepdim=True)  # (n_groups, 1)
    return ((word >> (torch.arange(8, device=packed.device) * bits)) & (2**bits - 1)).reshape(-1)[:n]


def encode(w: Tensor, scheme: str, block: int) -> tuple[Tensor, Tensor]:
    """``(codes, absmax)`` of ``w``: packed ``uint8`` codes and one float16 absmax per block."""
    _, bits = parse_scheme(scheme)
    require(isinstance(block, int) and block >= 2, "block", block, "must be an integer >= 2")
    flat = w.detach().float().reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block)  # (n_blocks, block)
    absmax = blocks.abs().amax(dim=1).to(torch.float16)  # (n_blocks,)
    tiny = torch.finfo(torch.float16).tiny
    code = _levels(scheme).to(w.device)  # (2**bits,)
    normed = blocks / absmax.float().clamp_min(tiny)[:, None]
    idx = torch.bucketize(normed, (code[1:] + code[:-1]) / 2)  # nearest level, (n_blocks, block)
    return _pack(idx.reshape(-1), bits), absmax


def decode(codes: Tensor, absmax: Tensor, scheme: str, block: int, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """The dequantised weight (``shape``, ``dtype``) of :func:`encode`'s output."""
    n_blocks = absmax.numel()
    idx = _unpack(codes, parse_scheme(scheme)[1], n_blocks * block).reshape(n_blocks, block)
    out = _levels(scheme).to(codes.device)[idx] * absmax.float()[:, None]  # (n_blocks, block)
    return out.reshape(-1)[: shape.numel()].reshape(shape).to(dtype)


class CodebookLinear(nn.Linear):
    """A frozen ``nn.Linear`` stored as :func:`encode` codes; computes ``x dequant(W)^T + b`` in ``x``'s dtype."""

    def __init__(self, linear: nn.Linear, scheme: str, block: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme, self.block = scheme, block
        self.compute_dtype = linear.weight.dtype
        self.register_buffer("codes", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("absmax", torch.empty(0, dtype=torch.float16))
        self.set_weight(linear.weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @torch.no_grad()
    def set_weight(self, weight: Tensor) -> None:
        self.codes, self.absmax = encode(weight, self.scheme, self.block)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``(out_features, in_features)`` in ``dtype`` (default: the original weight's dtype)."""
        return decode(self.codes, self.absmax, self.scheme, self.block, self.shape, dtype or self.compute_dtype)

    @property
    def weight(self) -> Tensor:  # nn.Linear's API (read-only): the dequantised weight
        return self.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, " \
               f"block={self.block}"
