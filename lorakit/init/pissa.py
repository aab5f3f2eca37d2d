"""PiSSA (Meng et al., 2024; METHODS.md entry 20): the principal singular pairs become the adapter.

    W = U S V^T,   B = U[:, :r] S[:r]^{1/2} / sqrt(s),   A = S[:r]^{1/2} V[:, :r]^T / sqrt(s),
    W_res = W - s B A = U[:, r:] S[r:] V[:, r:]^T

so ``W_res + s B A == W`` at init. The division by ``s`` (PEFT divides ``S`` by the scaling) keeps the identity
for any ``alpha``; the paper uses ``alpha = r``. ``niter`` selects the paper's fast randomized SVD
(``niter`` subspace iterations, :func:`~lorakit.init.linalg.top_svd`) instead of the exact one.
"""
from __future__ import annotations

from torch import Tensor

from .linalg import check_rank, top_svd
from .registry import Factors, register_init


@register_init("pissa", options={"niter": None, "seed": 0})
def pissa(w: Tensor, r: int, scale: float, niter: int | None = None, seed: int = 0) -> Factors:
    """Factors of ``w`` (``(rows, cols)``, float32) from its top-``r`` singular triplets."""
    check_rank("pissa", r, w)
    u, s, vh = top_svd(w, r, niter=niter, seed=seed)  # (rows, r), (r,), (r, cols)
    root = (s / scale).sqrt()  # (r,)
    return Factors(b=u * root, a=root[:, None] * vh, compensate=True)
