"""LoftQ (Li et al., 2023): quantisation-aware initialisation by alternating quantisation and low-rank fitting.

    Q_t = quant(W - s B_{t-1} A_{t-1}),   s B_t A_t = SVD_r(W - Q_t)        (B_0 A_0 = 0, t = 1..iters)

The base becomes ``Q_T`` and the adapter starts at ``B_T, A_T``, so ``||W - Q_T - s B_T A_T||`` is what the
adapted model's initial weight misses; it does not increase with ``iters`` (the iteration is LQ-LoRA's,
:func:`lorakit.init.alternating.decompose`, which keeps the best iterate). ``quant`` is a real codec of
:mod:`lorakit.hosts.codecs` (``backend``: ``"lorakit"`` k-bit codebook, ``"torchao"`` or ``"bitsandbytes"`` NF4)
with ``scheme`` and ``block``. The dense backend stores the dequantised ``Q_T``. LoftQ needs ``W`` itself, so
for a really quantised base adapt first, then :func:`lorakit.quantize` with the same backend, scheme and block:
the stored base is ``Q_T`` requantised, exactly ``Q_T`` with lorakit's idempotent codebook and within a block-scale
step with the libraries' double-quantised NF4 (on an already quantised base LoftQ would factorise ``Q(W)``).
"""
from __future__ import annotations

from torch import Tensor

from ..errors import require
from .alternating import decompose
from .linalg import check_rank
from .registry import Factors, register_init


@register_init("loftq", options={"iters": 1, "scheme": "nf4", "backend": "lorakit", "block": 64})
def loftq(w: Tensor, r: int, scale: float, iters: int = 1, scheme: str = "nf4", backend: str = "lorakit",
          block: int = 64) -> Factors:
    """LoftQ factors and quantised base for ``w`` (``(rows, cols)``, float32)."""
    check_rank("loftq", r, w)
    require(isinstance(iters, int) and iters >= 1, "init_options['iters']", iters, "must be a positive integer")
    found = decompose(w, r, scheme, block, iters, backend)
    root = scale**-0.5
    return Factors(b=found.l1 * root, a=found.l2 * root, base=found.q.to(w.dtype))
