"""Scatterbrain (Chen et al., 2021; METHODS.md entry 73): attention as sparse + low-rank, after robust PCA.

Exact attention is ``softmax(Q K^T / sqrt(d)) V = D^{-1} A V`` with the unnormalised ``A_ij = exp(q_i . k_j)``
(``q, k`` scaled by ``d^{-1/4}``) and ``D = diag(A 1)``. Scatterbrain estimates ``A`` by

    low-rank   L = phi(Q) phi(K)^T,   phi(x) = exp(W^T x - |x|^2 / 2) / sqrt(m),  W (d, m) iid N(0, 1)   (FAVOR+)
    sparse     S_ij = A_ij - L_ij   on the support  s = LSH same-bucket pairs (+ an optional local band), else 0
    estimate   A_hat = L + S,       out = diag(A_hat 1)^{-1} A_hat V

so ``A_hat`` is exact on the support and the unbiased random-feature estimate elsewhere (``E[L] = A``). Positive
features keep every entry of ``A_hat`` positive, so the row sums never vanish.

Assumed (the abstract names LSH without the scheme): the support is found by asymmetric MIPS hashing — keys are
padded to equal norm with one extra coordinate, queries normalised, so the angle tracks the inner product — and a
random-projection argmax hash (``bucket = argmax_j x . r_j`` over ``buckets`` Gaussian directions, ``hashes``
independent rounds, pairs colliding in any round selected). Features are iid Gaussian (orthogonal features, also
unbiased, are not used). The sparse part is evaluated through a dense ``(T, S)`` mask: exact and simple, with
O(T S) memory; the linear-memory bucketed kernel of the paper is not implemented. Every row is stabilised by a
per-query constant that cancels in the normalisation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import require


def _generator(seed: int, stream: int) -> torch.Generator:
    """Independent streams for the features (0) and the hash projections (1) of one ``seed``."""
    return torch.Generator().manual_seed(2 * seed + stream)


def draw_features(dim: int, features: int, seed: int) -> Tensor:
    """The FAVOR+ projection ``W`` (dim, features), iid standard normal, from ``seed``."""
    require(features >= 1, "features", features, "must be >= 1")
    return torch.randn(dim, features, generator=_generator(seed, 0))


def _log_features(x: Tensor, w: Tensor) -> Tensor:
    """``log phi(x)`` (..., T, m)."""
    return x @ w - x.pow(2).sum(-1, keepdim=True) / 2 - math.log(w.shape[-1]) / 2


def positive_features(x: Tensor, w: Tensor) -> Tensor:
    """``phi(x) = exp(W^T x - |x|^2 / 2) / sqrt(m)`` (..., T, m): ``E_W[phi(q) . phi(k)] = exp(q . k)``."""
    return _log_features(x, w).exp()


def lsh_support(q: Tensor, k: Tensor, buckets: int, hashes: int, seed: int, window: int | None = None) -> Tensor:
    """The sparse support (..., Tq, Tk) bool: query/key pairs sharing a bucket in any of ``hashes`` rounds, or
    ``|i - j| <= window``. ``buckets=1`` selects every pair; ``hashes=0`` and no window selects none."""
    require(buckets >= 1, "buckets", buckets, "must be >= 1")
    require(hashes >= 0, "hashes", hashes, "must be >= 0")
    require(window is None or window >= 0, "window", window, "must be None or >= 0")
    tq, tk = q.shape[-2], k.shape[-2]
    support = torch.zeros(*q.shape[:-2], tq, tk, dtype=torch.bool, device=q.device)
    if hashes:
        norms = k.norm(dim=-1, keepdim=True)                                       # (..., S, 1)
        top = norms.amax(dim=-2, keepdim=True).clamp_min(1e-12)
        keys = torch.cat([k / top, (1 - (norms / top).pow(2)).clamp_min(0).sqrt()], -1)        # (..., S, d+1)
        queries = torch.cat([q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12), torch.zeros_like(q[..., :1])], -1)
        proj = torch.randn(hashes, q.shape[-1] + 1, buckets, generator=_generator(seed, 1)).to(q)
        for r in proj:                                                             # (d+1, buckets)
            hq, hk = (queries @ r).argmax(-1), (keys @ r).argmax(-1)                # (..., T), (..., S)
            support |= hq.unsqueeze(-1) == hk.unsqueeze(-2)
    if window is not None:
        pos_q = torch.arange(tq, device=q.device).unsqueeze(-1)
        pos_k = torch.arange(tk, device=q.device)
        support |= (pos_q - pos_k).abs() <= window
    return support


def scatterbrain_attention(q: Tensor, k: Tensor, v: Tensor, features: int, buckets: int, hashes: int,
                           seed: int = 0, window: int | None = None) -> Tensor:
    """Scatterbrain estimate of ``softmax(q k^T / sqrt(d)) v``: q (..., T, d), k (..., S, d), v (..., S, e) ->
    (..., T, e). ``hashes=0`` (no window) is Performer alone; full support (``buckets=1``) is exact attention."""
    require(q.shape[-1] == k.shape[-1], "k", tuple(k.shape), f"must have the queries' last dim {q.shape[-1]}")
    require(k.shape[-2] == v.shape[-2], "v", tuple(v.shape), f"must have the keys' length {k.shape[-2]}")
    scale = q.shape[-1] ** -0.25
    qs, ks = q * scale, k * scale
    support = lsh_support(qs, ks, buckets, hashes, seed, window)                  # (..., T, S)
    w = draw_features(q.shape[-1], features, seed).to(q)
    lq, lk = _log_features(qs, w), _log_features(ks, w)                          # (..., T, m), (..., S, m)
    ck = lk.amax(dim=(-2, -1), keepdim=True)                                      # (..., 1, 1)
    dots = qs @ ks.transpose(-1, -2)                                              # (..., T, S)
    sparse_top = dots.masked_fill(~support, float("-inf")).amax(-1, keepdim=True)  # (..., T, 1)
    cq = torch.maximum(lq.amax(-1, keepdim=True) + ck, sparse_top)               # (..., T, 1) per-row stabiliser
    phi_q, phi_k = (lq + ck - cq).exp(), (lk - ck).exp()                         # exp(-cq) phi(q) phi(k)^T
    low = phi_q @ phi_k.transpose(-1, -2)                                         # (..., T, S)
    correction = torch.where(support, (dots - cq).exp() - low, torch.zeros_like(low))
    num = phi_q @ (phi_k.transpose(-1, -2) @ v) + correction @ v                  # (..., T, e)
    den = phi_q @ phi_k.sum(-2).unsqueeze(-1) + correction.sum(-1, keepdim=True)  # (..., T, 1)
    return num / den


class ScatterbrainAttention(nn.Module):
    """Multi-head self-attention with :func:`scatterbrain_attention` in place of softmax attention."""

    def __init__(self, dim: int, heads: int, features: int, buckets: int, hashes: int,
                 window: int | None = None, seed: int = 0) -> None:
        super().__init__()
        require(heads >= 1 and dim % heads == 0, "heads", heads, f"must be >= 1 and divide dim={dim}")
        self.heads, self.features, self.buckets, self.hashes = heads, features, buckets, hashes
        self.window, self.seed = window, seed
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, dim = x.shape                                                        # (B, T, dim)
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, dh)
        mixed = scatterbrain_attention(q, k, v, self.features, self.buckets, self.hashes, self.seed, self.window)
        return self.out(mixed.transpose(1, 2).reshape(b, t, dim))                 # (B, T, dim)
