"""LoftQ's simulated quantiser: ``dequantize(quantize(w))`` through a real codec (:mod:`lorakit.hosts.codecs`).

Kept for its name and signature; the quantisation itself lives once, in the codecs. ``kind="nf4"`` is k-bit
NormalFloat, ``kind="uniform"`` evenly spaced absmax levels, both blockwise (lorakit's codebook codec, which
reaches every bit width); pass ``backend="torchao"`` / ``"bitsandbytes"`` for the libraries' NF4.
"""
from __future__ import annotations

from torch import Tensor

from ..errors import require
from ..hosts.codecs import check_available


def scheme_of(kind: str, bits: int) -> str:
    """``("nf4", 4)`` -> ``"nf4"``, ``("uniform", 3)`` -> ``"int3"``."""
    require(kind in ("nf4", "uniform"), "kind", kind, "must be 'nf4' or 'uniform'")
    if kind == "nf4":
        require(bits == 4, "bits", bits, "must be 4 for the nf4 codebook")
        return "nf4"
    return f"int{bits}"


def fake_quantize(w: Tensor, kind: str = "nf4", bits: int = 4, block: int = 64, backend: str = "lorakit") -> Tensor:
    """``dequantize(quantize(w))`` of a 2-D ``w`` with the blockwise absmax quantiser ``backend`` provides."""
    return check_available(backend).fake_quantize(w, scheme_of(kind, bits), block)
