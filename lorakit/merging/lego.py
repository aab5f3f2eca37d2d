"""LoRA-LEGO: merging LoRAs by clustering their rank-wise units (METHODS.md entry 42).

Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through Rank-Wise
Clustering" (ICLR 2025, arXiv:2409.16167). A LoRA update ``delta = B A`` (scale folded into ``B``) is the sum of its
*minimal semantic units* (MSUs) ``u_j = b_j a_j^T`` (``b_j``: column j of B, ``a_j``: row j of A), hence

* permutation invariance: ``(B P)(P^T A) = B A`` for any permutation P of the ranks;
* concatenation-summation equivalence: ``[B_1 ... B_n][A_1; ...; A_n] = sum_i B_i A_i``.

:func:`lego_merge` pools the units of n LoRAs (LoRA i's ``b`` times its weight ``w_i``), clusters them into k groups,
makes each group one unit of a rank-k LoRA and rescales it (the paper's dual reweighting). What the abstract leaves
open (the paper runs k-means on raw ``[b_j; a_j]`` and takes mean centroids), and what is done here:

* Representation: a unit is defined only up to ``(b, a) -> (c b, a / c)``, c != 0 (sign flips included), so units are
  clustered as normalised outer products ``u_j / ||u_j||_F``, whose inner products ``G_ij = (b^_i . b^_j)(a^_i . a^_j)``
  (``b^ = b / ||b||``) need no d_out x d_in matrix and are invariant to that rescaling; ``u`` and ``-u`` are opposite
  updates and stay far apart. Weighted kernel k-means, unit j weighing its magnitude ``s_j = ||b_j|| ||a_j||``, so a
  centroid points along the sum of its members.
* Order independence: units are sorted by decreasing magnitude before a seeded k-means++ init, so the result does not
  depend on the order of ranks or LoRAs (up to exact magnitude ties between different units).
* Merged unit: cluster c becomes the best rank-1 approximation of ``M_c = sum_{j in c} u_j`` (Eckart-Young; QR of its
  members' factors, SVD of the small core), not a mean; with k >= the number of units the merge is the concatenation.
* Reweighting, data-free (an isotropic probe x has ``E||delta x||^2 = ||delta||_F^2``): ``"parameter"`` (norm decay)
  scales unit c to ``||b'_c|| ||a'_c|| = sum_{j in c} s_j``, its members' magnitudes added as if aligned;
  ``"output"`` scales the update to ``||B' A'||_F = ||sum_i w_i B_i A_i||_F``; ``"dual"`` does both, in that order;
  ``"none"`` neither. Every scale is split evenly between ``b'`` and ``a'``, leaving ``||b'_c|| = ||a'_c||``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import require

REWEIGHTS = ("none", "parameter", "output", "dual")


def rank_units(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """The r MSUs of ``delta = b @ a``: unit j is ``(b[:, j], a[j])``, stacked as ``(r, d_out), (r, d_in)`` (views)."""
    require(b.dim() == 2 and a.dim() == 2 and b.shape[1] == a.shape[0], "factors", (tuple(b.shape), tuple(a.shape)),
            "need B (d_out, r) and A (r, d_in)")
    return b.t(), a


def cluster_units(ub: Tensor, ua: Tensor, k: int, *, iters: int = 50, seed: int = 0) -> Tensor:
    """Labels ``(N,)`` of the units (rows of ``ub (N, d_out)``, ``ua (N, d_in)``) in ``[0, k)``; -1 for zero units.

    Weighted kernel k-means on the normalised outer products (module docstring), in float64 on the CPU. Clusters are
    numbered in the order the init picks them; fewer than k are used when the units have fewer distinct directions.
    """
    require(isinstance(k, int) and k >= 1, "k", k, "must be an integer >= 1")
    mag = ub.norm(dim=1) * ua.norm(dim=1)
    order = torch.argsort(mag, descending=True, stable=True)
    order = order[mag[order] > 0]
    labels = torch.full((len(mag),), -1, dtype=torch.long)
    if len(order):
        bn, an = F.normalize(ub[order].double(), dim=1), F.normalize(ua[order].double(), dim=1)
        gram, s = ((bn @ bn.T) * (an @ an.T)).cpu(), mag[order].double().cpu()
        centres = _seed_centres(gram, s, k, torch.Generator().manual_seed(seed))
        labels[order.cpu()] = _lloyd(gram, s, gram[:, centres].argmax(1), len(centres), iters)
    return labels.to(ub.device)


def lego_merge(factors: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float] | None, rank: int, *,
               reweight: str = "output", iters: int = 50, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Merge n LoRAs ``(B_i (d_out, r_i), A_i (r_i, d_in))`` of one layer into ``(B (d_out, rank), A (rank, d_in))``.

    The target is ``sum_i w_i B_i A_i`` (``weights=None``: all 1, the concatenation; ``1/n`` averages); ranks may
    differ and weights may be negative. Unit c of the result is cluster c of :func:`cluster_units` on the pooled
    weighted units; clusters left empty give zero units. Computed in at least float32, returned in ``factors[0]``'s
    dtype.
    """
    w = _checked_weights(factors, weights, rank, reweight, iters)
    ub, ua = _pool(factors, w)
    labels = cluster_units(ub, ua, rank, iters=iters, seed=seed)
    mb, ma = map(torch.stack, zip(*(_rank_one(ub[labels == c], ua[labels == c]) for c in range(rank))))
    if reweight in ("parameter", "dual"):
        mag = ub.norm(dim=1) * ua.norm(dim=1)
        target = torch.stack([mag[labels == c].sum() for c in range(rank)])
        mb, ma = _rescale(mb, ma, target / (mb.norm(dim=1) * ma.norm(dim=1)))
    if reweight in ("output", "dual"):
        mb, ma = _rescale(mb, ma, (_frobenius2(ub, ua) / _frobenius2(mb, ma)).sqrt())
    dtype = factors[0][0].dtype
    return mb.T.contiguous().to(dtype), ma.to(dtype)


def _checked_weights(factors: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float] | None, rank: int,
                     reweight: str, iters: int) -> list[float]:
    """Validate :func:`lego_merge`'s arguments; the weights as floats (``None``: all 1)."""
    require(len(factors) > 0, "factors", len(factors), "need at least one LoRA")
    for b, a in factors:
        rank_units(b, a)  # checks each LoRA's shapes
    dims = sorted({(b.shape[0], a.shape[1]) for b, a in factors})
    require(len(dims) == 1, "factors", dims, "every LoRA must have the same (d_out, d_in)")
    w = [1.0] * len(factors) if weights is None else [float(x) for x in weights]
    require(len(w) == len(factors), "weights", weights, f"need one weight per LoRA ({len(factors)})")
    require(all(math.isfinite(x) for x in w), "weights", weights, "must be finite numbers")
    require(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1, "rank", rank, "must be an integer >= 1")
    require(reweight in REWEIGHTS, "reweight", reweight, f"must be one of {REWEIGHTS}")
    require(isinstance(iters, int) and iters >= 0, "iters", iters, "must be an integer >= 0")
    return w


def _pool(factors: Sequence[tuple[Tensor, Tensor]], weights: list[float]) -> tuple[Tensor, Tensor]:
    """All units of all LoRAs, LoRA i's ``b`` times ``w_i``: ``(N, d_out), (N, d_in)`` with ``N = sum_i r_i``."""
    work = torch.promote_types(factors[0][0].dtype, torch.float32)
    units = [rank_units(b, a) for b, a in factors]
    return (torch.cat([ub.to(work) * w for (ub, _), w in zip(units, weights)]),
            torch.cat([ua.to(work) for _, ua in units]))


def _seed_centres(gram: Tensor, s: Tensor, k: int, gen: torch.Generator) -> list[int]:
    """Weighted k-means++ (Arthur & Vassilvitskii, 2007) on squared distances ``2 - 2 G``: at most k unit indices."""
    centres = [int(torch.multinomial(s, 1, generator=gen))]
    d2 = (2 - 2 * gram[:, centres[0]]).clamp_min(0)
    while len(centres) < k:
        d2[centres] = 0
        if not (s * d2).sum() > 0:  # every unit sits on a centre
            break
        centres.append(int(torch.multinomial(s * d2, 1, generator=gen)))
        d2 = torch.minimum(d2, (2 - 2 * gram[:, centres[-1]]).clamp_min(0))
    return centres


def _lloyd(gram: Tensor, s: Tensor, labels: Tensor, k: int, iters: int) -> Tensor:
    """Weighted kernel k-means steps from ``labels`` until they settle; a cluster that empties stays empty."""
    tiny = torch.finfo(gram.dtype).tiny
    for _ in range(iters):
        member = F.one_hot(labels, k).to(gram.dtype) * s[:, None]  # (N, k)
        mass = member.sum(0)
        cross = gram @ member / mass.clamp_min(tiny)  # <u^_j, m_c>, m_c the weighted mean of cluster c
        norm2 = (member * cross).sum(0) / mass.clamp_min(tiny)  # ||m_c||^2
        new = torch.where(mass > 0, norm2 - 2 * cross, math.inf).argmin(1)  # ||u^_j - m_c||^2 - 1
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def _rank_one(ub: Tensor, ua: Tensor) -> tuple[Tensor, Tensor]:
    """Best rank-1 ``b a^T`` of ``ub^T ua``: ``||b|| = ||a||``, b's largest-magnitude entry positive; zeros if empty."""
    if len(ub) == 0:
        return ub.new_zeros(ub.shape[1]), ua.new_zeros(ua.shape[1])
    qb, rb = torch.linalg.qr(ub.T)
    qa, ra = torch.linalg.qr(ua.T)
    u, sv, vh = torch.linalg.svd(rb @ ra.T)  # ub^T ua = qb (u S vh) qa^T
    b, a = qb @ u[:, 0] * sv[0].sqrt(), qa @ vh[0] * sv[0].sqrt()
    sign = b[b.abs().argmax()].sign()
    return b * sign, a * sign


def _frobenius2(ub: Tensor, ua: Tensor) -> Tensor:
    """``||ub^T ua||_F^2 = sum((ub ub^T) * (ua ua^T))`` without the d_out x d_in product."""
    return ((ub @ ub.T) * (ua @ ua.T)).sum()


def _rescale(mb: Tensor, ma: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    """Units (rows) times ``gain`` (per unit or one), split evenly; a unit whose gain is undefined (0/0) is kept."""
    root = torch.where(torch.isfinite(gain), gain, 1.0).sqrt().reshape(-1, 1)
    return mb * root, ma * root
