"""Unified low-rank compression of CTR models (Yu et al., 2024; METHODS.md entry 70).

A small DeepFM-style CTR model (:class:`CTRModel`, from :class:`CTRConfig`): one embedding table per categorical
field, a pairwise factorisation-machine term ``sum_{f<g} <e_f, e_g>`` and an MLP on the concatenated embeddings.
Its two kinds of layer are compressed by low-rank factors:

    embedding table   E (n, d) ≈ A B,   A (n, k), B (k, d)       lookup i = A[i] B   (:class:`FactorisedEmbedding`)
    MLP layer         W (o, i) ≈ U V,   V (k, i), U (o, k)        (lorakit.compress.factored.FactoredLinear)

either trained in factorised form from the start (``embed_rank`` / ``mlp_rank`` in the config) or obtained from a
trained dense model by :func:`compress_ctr`: truncated SVD of every table, and for the MLP the paper's
output-feature compression (:func:`pca_compress`, from its repository name "Atomic Feature Mimicking"; the
abstract only says "locally compress the output features"): with ``mu`` and ``U_k`` the mean and top-``k``
principal directions of the layer's outputs ``y = W x + b`` on data,

    W' = U_k (U_k^T W),   b' = U_k U_k^T b + (I - U_k U_k^T) mu,   so  y' = mu + U_k U_k^T (y - mu),

whose mean squared output error is the sum of the discarded eigenvalues of the output covariance. The MLP
layers are compressed locally (each on the dense model's own inputs to it). :func:`synthetic_clicks` makes
seeded data with a known low-rank structure; :func:`auc` is the rank-based (Mann-Whitney) AUC.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import require
from .factored import FactoredLinear


@dataclass(frozen=True)
class CTRConfig:
    """``fields``: the cardinality of each categorical feature; ranks ``None`` mean dense layers."""

    fields: tuple[int, ...]
    embed_dim: int = 16
    mlp: tuple[int, ...] = (64, 32)
    embed_rank: int | None = None
    mlp_rank: int | None = None

    def __post_init__(self) -> None:
        require(len(self.fields) >= 2 and min(self.fields) >= 1, "fields", self.fields,
                "must name >= 2 features, each with >= 1 value")
        require(self.embed_dim >= 1, "embed_dim", self.embed_dim, "must be >= 1")
        require(all(w >= 1 for w in self.mlp), "mlp", self.mlp, "widths must be >= 1")
        for name in ("embed_rank", "mlp_rank"):
            rank = getattr(self, name)
            require(rank is None or rank >= 1, name, rank, "must be None or >= 1")


class FactorisedEmbedding(nn.Module):
    """An embedding table stored as ``A B``: A (n, k), B (k, d)."""

    def __init__(self, num: int, dim: int, rank: int) -> None:
        super().__init__()
        self.a = nn.Embedding(num, rank)
        self.b = nn.Linear(rank, dim, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.b(self.a(ids))                                                # (..., d)

    def weight(self) -> Tensor:
        """The represented table (n, d)."""
        return self.a.weight @ self.b.weight.T


class CTRModel(nn.Module):
    """DeepFM-style: ``logit = FM(e) + head(MLP(concat(e)))`` over the field embeddings ``e``."""

    def __init__(self, config: CTRConfig) -> None:
        super().__init__()
        self.config = config
        d, er, mr = config.embed_dim, config.embed_rank, config.mlp_rank
        self.embeddings = nn.ModuleList(
            nn.Embedding(n, d) if er is None else FactorisedEmbedding(n, d, er) for n in config.fields)
        widths = (len(config.fields) * d, *config.mlp)
        self.mlp = nn.ModuleList(nn.Linear(i, o) if mr is None else FactoredLinear(i, o, mr)
                                 for i, o in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], 1)
        for table in self.embeddings:
            for p in table.parameters():
                nn.init.normal_(p, std=d ** -0.5 if er is None else (d * er) ** -0.25)

    def embed(self, x: Tensor) -> Tensor:
        """x (B, F) int64 -> field embeddings (B, F, d)."""
        return torch.stack([table(x[:, f]) for f, table in enumerate(self.embeddings)], 1)

    def forward(self, x: Tensor) -> Tensor:
        e = self.embed(x)                                                         # (B, F, d)
        fm = (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(-1) / 2                      # (B,) sum_{f<g} <e_f, e_g>
        h = e.flatten(1)                                                          # (B, F d)
        for layer in self.mlp:
            h = F.relu(layer(h))
        return fm + self.head(h).squeeze(-1)                                      # (B,) logits


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def synthetic_clicks(fields: Sequence[int], n: int, rank: int, seed: int = 0,
                     noise: float = 0.5) -> tuple[Tensor, Tensor]:
    """Clicks whose logit is ``sum_{f<g} <u_f[x_f], u_g[x_g]>`` over rank-``rank`` latent vectors ``u`` per field
    value, standardised to std 2, plus ``noise`` * N(0, 1). Returns x (n, F) int64 and y (n,) in {0, 1}."""
    require(rank >= 1, "rank", rank, "must be >= 1")
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.randint(0, c, (n,), generator=g) for c in fields], 1)            # (n, F)
    u = torch.stack([torch.randn(c, rank, generator=g)[x[:, f]] for f, c in enumerate(fields)], 1)  # (n, F, r)
    logit = (u.sum(1).pow(2) - u.pow(2).sum(1)).sum(-1) / 2                     # (n,)
    logit = 2 * (logit - logit.mean()) / logit.std() + noise * torch.randn(n, generator=g)
    return x, torch.bernoulli(torch.sigmoid(logit), generator=g)


def auc(scores: Tensor, labels: Tensor) -> float:
    """Rank-based ROC AUC: P(score of a random positive > a random negative), ties counting 1/2."""
    labels = labels.bool().flatten()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    require(positives > 0 and negatives > 0, "labels", (positives, negatives), "need both classes")
    values, inverse, counts = torch.unique(scores.flatten().double(), return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts                                    # 0-based start of each tie group
    ranks = (first + (counts + 1) / 2)[inverse]                                 # average 1-based rank
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def train_ctr(model: CTRModel, x: Tensor, y: Tensor, steps: int, lr: float = 1e-2, batch: int = 256,
              seed: int = 0) -> list[float]:
    """Adam on the binary cross-entropy over random mini-batches; returns the losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = F.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def output_pca(layer: nn.Linear, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean (out,), eigenvalues (out,) descending and eigenvectors (out, out) (columns) of the covariance of
    ``layer``'s outputs on ``inputs`` (n, in)."""
    y = layer(inputs).double()                                                  # (n, out)
    mean = y.mean(0)
    values, vectors = torch.linalg.eigh((y - mean).T @ (y - mean) / y.shape[0])
    return mean, values.flip(0).clamp_min(0), vectors.flip(1)


@torch.no_grad()
def pca_compress(layer: nn.Linear, inputs: Tensor, k: int) -> FactoredLinear:
    """``layer`` with its outputs projected on their top-``k`` principal directions on ``inputs``."""
    require(1 <= k <= layer.out_features, "k", k, f"must be in [1, {layer.out_features}]")
    mean, _, vectors = output_pca(layer, inputs)
    u = vectors[:, :k]                                                          # (out, k)
    w, dtype = layer.weight.double(), layer.weight.dtype
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
    bias = u @ (u.T @ b) + mean - u @ (u.T @ mean)                              # (out,)
    return FactoredLinear.from_factors(u.to(dtype), (u.T @ w).to(dtype), bias.to(dtype))   # up (out, k), down (k, in)


@torch.no_grad()
def svd_embedding(table: nn.Embedding, k: int) -> FactorisedEmbedding:
    """The rank-``k`` truncated SVD of ``table``'s weight as ``A B``."""
    require(1 <= k <= min(table.weight.shape), "k", k, f"must be in [1, {min(table.weight.shape)}]")
    u, s, vh = torch.linalg.svd(table.weight.double(), full_matrices=False)
    out = FactorisedEmbedding(table.num_embeddings, table.embedding_dim, k)
    out.a.weight.copy_(u[:, :k] * s[:k])
    out.b.weight.copy_(vh[:k].T)
    return out


@torch.no_grad()
def compress_ctr(model: CTRModel, x: Tensor, embed_rank: int, mlp_rank: int) -> CTRModel:
    """A factorised copy of a dense ``model``: SVD of every table, output-feature PCA of every MLP layer on the
    dense model's own activations for the data ``x`` (n, F)."""
    require(model.config.embed_rank is None and model.config.mlp_rank is None, "model", model.config,
            "must be dense (no embed_rank / mlp_rank)")
    small = CTRModel(replace(model.config, embed_rank=embed_rank, mlp_rank=mlp_rank))
    small.embeddings = nn.ModuleList(svd_embedding(t, embed_rank) for t in model.embeddings)
    h = model.embed(x).flatten(1)                                               # (n, F d)
    layers = []
    for layer in model.mlp:
        layers.append(pca_compress(layer, h, mlp_rank))
        h = F.relu(layer(h))
    small.mlp = nn.ModuleList(layers)
    small.head.load_state_dict(model.head.state_dict())
    return small
