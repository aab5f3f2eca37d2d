"""Truncated SVDs for the initialisers: exact, or the randomized range finder of Halko, Martinsson & Tropp (2011).

PiSSA's "fast SVD" is this randomized SVD with a few subspace iterations (``niter``); unlike ``torch.svd_lowrank``
it draws its test matrix from a seeded generator, so the same weight always gives the same factors (which keeps
re-initialising on load reproducible).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import require

MAX_NITER = 1000  # subspace iterations converge in tens; more is only work (and a file could ask for 10**12)


def top_svd(w: Tensor, k: int, niter: int | None = None, oversample: int = 8,
            seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(U_k, S_k, Vh_k)`` of ``w`` (``(m, n)``, float): ``U_k (m, k)``, ``S_k (k,)`` descending, ``Vh_k (k, n)``.

    ``niter=None`` is the exact SVD; an integer runs Halko et al.'s Algorithm 4.4 (randomized subspace iteration)
    with ``k + oversample`` columns and ``niter`` power iterations, re-orthonormalised each half-step.
    """
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    require(isinstance(niter, int) and 0 <= niter <= MAX_NITER, "niter", niter,
            f"must be None (exact) or an integer in [0, {MAX_NITER}]")
    m, n = w.shape
    q = min(k + oversample, m, n)
    gen = torch.Generator(device=w.device).manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, device=w.device, dtype=w.dtype)  # (n, q)
    basis = torch.linalg.qr(w @ omega).Q  # (m, q)
    for _ in range(niter):
        basis = torch.linalg.qr(w.t() @ basis).Q  # (n, q)
        basis = torch.linalg.qr(w @ basis).Q  # (m, q)
    u_small, s, vh = torch.linalg.svd(basis.t() @ w, full_matrices=False)  # (q, q), (q,), (q, n)
    return (basis @ u_small)[:, :k], s[:k], vh[:k]


def check_rank(name: str, r: int, w: Tensor, needed: int | None = None) -> None:
    """Raise a clear error when ``w`` has fewer singular directions than the initialiser needs."""
    needed = r if needed is None else needed
    require(needed <= min(w.shape), "r", r,
            f"init {name!r} needs {needed} singular directions but the layer's {tuple(w.shape)} matrix has "
            f"{min(w.shape)}")
