"""LoftQ (Li et al., 2023): quantisation-aware initialisation by alternating quantisation and low-rank fitting.

    Q_t = quant(W - s B_{t-1} A_{t-1}),   s B_t A_t = SVD_r(W - Q_t)        (B_0 A_0 = 0, t = 1..iters)

The base becomes ``Q_T`` and the adapter starts at ``B_T, A_T``, so ``||W - Q_T - s B_T A_T||`` is what the
adapted model's initial weight misses; it decreases with ``iters``. The quantiser is the simulated one of
:mod:`lorakit.init.quantize` (the dense backend stores the dequantised ``Q_T``).
"""
from __future__ import annotations

from torch import Tensor

from ..errors import require
from .linalg import check_rank, top_svd
from .quantize import fake_quantize
from .registry import Factors, register_init


@register_init("loftq", options={"iters": 1, "bits": 4, "kind": "nf4", "block": 64})
def loftq(w: Tensor, r: int, scale: float, iters: int = 1, bits: int = 4, kind: str = "nf4",
          block: int = 64) -> Factors:
    """LoftQ factors and quantised base for ``w`` (``(rows, cols)``, float32)."""
    check_rank("loftq", r, w)
    require(isinstance(iters, int) and iters >= 1, "init_options['iters']", iters, "must be a positive integer")
    low_rank = w.new_zeros(w.shape)  # s B A, (rows, cols)
    for _ in range(iters):
        q = fake_quantize(w - low_rank, kind, bits, block)
        u, s, vh = top_svd(w - q, r)  # (rows, r), (r,), (r, cols)
        root = (s / scale).sqrt()
        b, a = u * root, root[:, None] * vh
        low_rank = scale * b @ a
    return Factors(b=b, a=a, base=q)
