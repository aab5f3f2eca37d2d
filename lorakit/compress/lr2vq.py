"""LR²VQ (Zhu et al., 2022; METHODS.md entry 71): low-rank representation + subvector quantisation of a weight.

A weight ``W`` (out, in) is cut into ``N = out * in / m`` subvectors of size ``m`` (row-major), the matrix
``W_s`` (N, m). LR²VQ represents it at rank ``d``:

    W_s ≈ Z P,         Z (N, d) the low-rank representation, P (d, m) a shared basis
    Z   ≈ C[codes],    C (k, d) a codebook of k centroids clustered in d dimensions, codes (N,) in [0, k)

so only the codes, the codebook and the basis are stored. The paper's three hyper-parameters: ``m`` (``subvector``)
sets the number of codes and so the compression ratio, ``d`` (``dim``) trades the rank-``d`` error against the
clustering error, ``k`` (``clusters``) the codebook size. :meth:`LR2VQLinear.compression_ratio` is

    ratio = 32 * out * in / (N * ceil(log2 k) + 32 * (k d + d m))      (bias not counted on either side)

Pipeline (the abstract says only "directly optimised through end-to-end training over the task loss"; the
schedule is assumed): :meth:`LR2VQLinear.from_linear` starts ``Z, P`` from the truncated SVD of ``W_s`` (the best
rank-``d`` representation), which may be trained as a plain low-rank layer; :meth:`LR2VQLinear.quantize`
initialises ``C`` by k-means (k-means++ seeding, Lloyd) on ``Z``; fine-tuning then uses ``C[codes]`` in the forward
pass with a straight-through estimator: the codebook gets the task gradient directly, ``Z`` gets the same gradient
(identity through the quantiser), codes are re-assigned to the nearest centroid at every training forward, and
:meth:`LR2VQLinear.commitment_loss` ``beta * sum_i |Z_i - sg(C[codes_i])|^2`` (VQ-VAE's) keeps ``Z`` near its
centroid. The straight-through gradient does not vanish at ``Z_i = Z*_i`` (it is taken at the centroid), so ``Z_i``
settles at ``C + (Z*_i - C) H / beta`` (``H`` the task loss's curvature): too small a ``beta`` lets it overshoot
across cluster boundaries and the codes churn. The sum (not mean) keeps each row's pull independent of ``N``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import require


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int = 25, seed: int = 0) -> tuple[Tensor, Tensor]:
    """k-means of the rows of ``x`` (N, d): centroids (k, d) and codes (N,) int64. k-means++ seeding, then Lloyd;
    an emptied cluster keeps its centroid."""
    require(1 <= k <= x.shape[0], "k", k, f"must be in [1, {x.shape[0]}] (the number of vectors)")
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    centroids = x[torch.randint(x.shape[0], (1,), generator=g)]                  # (1, d)
    for _ in range(k - 1):
        gap = torch.cdist(x, centroids).amin(1).pow(2)                           # (N,)
        pick = torch.multinomial(gap.cpu() + 1e-12, 1, generator=g).to(x.device)
        centroids = torch.cat([centroids, x[pick]])
    codes = torch.cdist(x, centroids).argmin(1)
    for _ in range(iters):
        counts = torch.bincount(codes, minlength=k).unsqueeze(1)                 # (k, 1)
        sums = torch.zeros_like(centroids).index_add_(0, codes, x)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        codes = torch.cdist(x, centroids).argmin(1)
    return centroids, codes


class LR2VQLinear(nn.Module):
    """A linear layer whose weight is ``reshape(C[codes] P)`` (after :meth:`quantize`) or ``reshape(Z P)``."""

    def __init__(self, in_features: int, out_features: int, subvector: int, dim: int, clusters: int,
                 bias: bool = True, commitment: float = 0.25) -> None:
        super().__init__()
        count = in_features * out_features
        require(subvector >= 1 and count % subvector == 0, "subvector", subvector,
                f"must divide in_features * out_features = {count}")
        require(1 <= dim <= subvector, "dim", dim, f"must be in [1, subvector={subvector}]")
        require(1 <= clusters <= count // subvector, "clusters", clusters,
                f"must be in [1, {count // subvector}] (the number of subvectors)")
        require(commitment >= 0, "commitment", commitment, "must be >= 0")
        self.in_features, self.out_features = in_features, out_features
        self.subvector, self.dim, self.clusters, self.commitment = subvector, dim, clusters, commitment
        n = count // subvector
        self.latent = nn.Parameter(torch.randn(n, dim) / math.sqrt(dim))         # Z (N, d)
        self.basis = nn.Parameter(torch.randn(dim, subvector) / math.sqrt(in_features))   # P (d, m)
        self.codebook = nn.Parameter(torch.zeros(clusters, dim))                 # C (k, d)
        self.register_buffer("codes", torch.zeros(n, dtype=torch.long))          # (N,)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.quantized = False

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, subvector: int, dim: int, clusters: int,
                    commitment: float = 0.25) -> LR2VQLinear:
        """Start from ``linear``'s weight: ``Z P`` is the rank-``dim`` truncated SVD of its subvector matrix."""
        layer = cls(linear.in_features, linear.out_features, subvector, dim, clusters,
                    linear.bias is not None, commitment)
        u, s, vh = torch.linalg.svd(linear.weight.detach().float().reshape(-1, subvector), full_matrices=False)
        root = s[:dim].sqrt()
        layer.latent.copy_(u[:, :dim] * root)                                    # (N, d)
        layer.basis.copy_(root.unsqueeze(1) * vh[:dim])                          # (d, m)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def quantize(self, iters: int = 25, seed: int = 0) -> None:
        """Cluster the low-rank representation: the codebook from k-means on ``Z``, the codes its assignments."""
        centroids, codes = kmeans(self.latent, self.clusters, iters, seed)
        self.codebook.copy_(centroids)
        self.codes.copy_(codes)
        self.quantized = True

    @torch.no_grad()
    def assign(self) -> None:
        """Re-assign each subvector's code to the centroid nearest to its ``Z`` row."""
        self.codes.copy_(torch.cdist(self.latent, self.codebook).argmin(1))

    def representation(self) -> Tensor:
        """``C[codes]`` with a straight-through gradient to ``Z`` once quantised, else ``Z`` (N, d)."""
        if not self.quantized:
            return self.latent
        return self.codebook[self.codes] + self.latent - self.latent.detach()

    def weight(self) -> Tensor:
        """The represented weight (out, in)."""
        return (self.representation() @ self.basis).reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.quantized:
            self.assign()
        return F.linear(x, self.weight(), self.bias)                             # (..., out)

    def commitment_loss(self) -> Tensor:
        """``beta * sum_i |Z_i - sg(C[codes_i])|^2``: add to the task loss while fine-tuning the quantised layer."""
        return self.commitment * (self.latent - self.codebook[self.codes].detach()).pow(2).sum()

    def compression_ratio(self, float_bits: int = 32) -> float:
        """Bits of the dense weight over bits of the codes, the codebook and the basis."""
        n = self.codes.numel()
        stored = n * math.ceil(math.log2(self.clusters)) \
            + float_bits * (self.clusters * self.dim + self.dim * self.subvector)
        return float_bits * self.in_features * self.out_features / stored
