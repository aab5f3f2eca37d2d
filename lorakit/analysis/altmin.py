"""Low-rank matrix completion by alternating minimisation that tolerates approximate updates (METHODS.md entry 84).

Gu, Song, Yin & Zhang, "Low Rank Matrix Completion via Robust Alternating Minimization in Nearly Linear Time"
(ICLR 2024), after Jain, Netrapalli & Sanghavi's AltMinComplete (STOC 2013). Given the entries ``M_ij`` on a set
``Omega``, find ``M ~ U V^T`` with ``U`` ``(m, r)``, ``V`` ``(n, r)``:

- initialisation (Jain et al.'s spectral start): ``U_0`` = the top-``r`` left singular vectors of ``P_Omega(M) / p``,
  ``p = |Omega| / (m n)``;
- alternating least squares on the observed entries (with a ridge term ``lam``), one closed form per row:

      v_j = (sum_{i: (i,j) in Omega} u_i u_i^T + lam I)^-1  sum_{i: (i,j) in Omega} M_ij u_i,

  and symmetrically for every row ``u_i`` of ``U``. All ``r x r`` systems of a half-step are built with one
  ``index_add`` over the observed entries and solved as one batch: ``O(|Omega| r^2 + (m + n) r^3)`` per half-step,
  the classical cost (the paper's sketching-based solver that brings it to ``O~(|Omega| r)`` is not reproduced);
- robustness to approximate solves (the paper's point): with ``update_noise = delta`` each half-step's
  exact solution ``X*`` is replaced by ``X* + delta ||X* - X_prev||_F G / ||G||_F`` (``G`` Gaussian), an error a
  fixed share of the step, like that of a warm-started iterative solver; the iteration still converges.

Iterations stop after ``iters`` rounds or once ``||P_Omega(U V^T - M)||_F <= tol ||P_Omega(M)||_F``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import require


def _check(observed: Tensor, mask: Tensor, rank: int, iters: int, tol: float, lam: float,
           update_noise: float) -> None:
    require(observed.dim() == 2 and observed.is_floating_point(), "observed", tuple(observed.shape),
            "must be a 2-D floating-point matrix")
    require(mask.dtype == torch.bool and mask.shape == observed.shape, "mask", (mask.dtype, tuple(mask.shape)),
            f"must be a bool tensor of the observed matrix's shape {tuple(observed.shape)}")
    require(isinstance(rank, int) and 1 <= rank <= min(observed.shape), "rank", rank,
            f"must be an integer in [1, {min(observed.shape)}] (the smaller dimension of the matrix)")
    require(isinstance(iters, int) and iters >= 1, "iters", iters, "must be an integer >= 1")
    require(tol >= 0, "tol", tol, "must be >= 0")
    require(lam >= 0, "lam", lam, "must be >= 0 (a ridge weight)")
    require(update_noise >= 0, "update_noise", update_noise, "must be >= 0 (a relative error of each half-step)")
    require(bool(mask.any()), "mask", int(mask.sum()), "must mark at least one observed entry")
    require(bool(torch.isfinite(observed[mask]).all()), "observed", "non-finite entries",
            "the observed entries must be finite")
    if lam == 0:
        for axis, label in ((1, "row"), (0, "column")):
            counts = mask.sum(dim=axis)
            short = torch.nonzero(counts < rank).flatten()
            first = int(short[0]) if short.numel() else 0
            require(short.numel() == 0, f"mask {label} {first}", f"{int(counts[first])} observed entries",
                    f"with lam=0 every {label} needs at least rank={rank} observed entries; observe more or set "
                    "lam > 0")


CHUNK = 1 << 15  # observed entries whose (r, r) outer products are built at once: keeps them in cache


def _solve(factor: Tensor, own: Tensor, other: Tensor, values: Tensor, count: int, lam: float) -> Tensor:
    """The ridge least-squares rows ``x_a`` (``a < count``) of ``min sum_{(a, b)} (values - x_a . factor_b)^2 +
    lam ||x_a||^2`` over the observed pairs ``(own, other)``, all solved as one batch; ``(count, r)``. The normal
    equations are summed over chunks of :data:`CHUNK` entries, so the cost per entry does not grow with ``|Omega|``."""
    r = factor.shape[1]
    gram = lam * torch.eye(r, dtype=factor.dtype, device=factor.device).repeat(count, 1, 1)  # (count, r, r)
    rhs = torch.zeros(count, r, dtype=factor.dtype, device=factor.device)  # (count, r)
    for start in range(0, own.numel(), CHUNK):
        part = slice(start, start + CHUNK)
        f = factor[other[part]]  # (chunk, r)
        gram.index_add_(0, own[part], f[:, :, None] * f[:, None, :])
        rhs.index_add_(0, own[part], f * values[part, None])
    return torch.linalg.solve(gram, rhs)


def _perturbed(exact: Tensor, previous: Tensor, update_noise: float, generator: torch.Generator) -> Tensor:
    """``exact`` plus an error of norm ``update_noise * ||exact - previous||_F`` in a random direction."""
    if update_noise == 0:
        return exact
    g = torch.randn(exact.shape, generator=generator, dtype=exact.dtype)
    return exact + update_noise * torch.linalg.norm(exact - previous) * (g / torch.linalg.norm(g)).to(exact.device)


def complete(observed: Tensor, mask: Tensor, rank: int, iters: int = 100, tol: float = 1e-6, lam: float = 0.0,
             update_noise: float = 0.0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(U, V)`` ``(m, rank)``, ``(n, rank)`` with ``U V^T`` completing the entries of ``observed`` ``(m, n)`` where
    ``mask`` is true (the other entries of ``observed`` are ignored). ``lam``: ridge weight of each row solve (needed
    when a row or column has fewer than ``rank`` observed entries); ``update_noise``: relative error injected into
    every half-step (``seed`` seeds it) to mimic approximate solves."""
    _check(observed, mask, rank, iters, tol, lam, update_noise)
    work = torch.promote_types(observed.dtype, torch.float64)
    m, n = observed.shape
    rows, cols = torch.nonzero(mask, as_tuple=True)  # (|Omega|,), (|Omega|,)
    values = observed[rows, cols].to(work)  # (|Omega|,)
    scaled = torch.zeros(m, n, dtype=work, device=observed.device)
    scaled[rows, cols] = values * (m * n / values.numel())  # P_Omega(M) / p
    u = torch.linalg.svd(scaled, full_matrices=False).U[:, :rank]  # (m, r)
    generator = torch.Generator().manual_seed(seed)
    start = torch.zeros(n, rank, dtype=work, device=observed.device)
    v = _perturbed(_solve(u, cols, rows, values, n, lam), start, update_noise, generator)  # (n, r)
    reference = torch.linalg.norm(values).clamp_min(torch.finfo(work).tiny)
    for _ in range(iters):
        u = _perturbed(_solve(v, rows, cols, values, m, lam), u, update_noise, generator)  # (m, r)
        v = _perturbed(_solve(u, cols, rows, values, n, lam), v, update_noise, generator)  # (n, r)
        residual = torch.linalg.norm((u[rows] * v[cols]).sum(dim=1) - values) / reference
        if residual <= tol:
            break
    dtype = torch.promote_types(observed.dtype, torch.float32)
    return u.to(dtype), v.to(dtype)
