"""Scatterbrain (lorakit.compress.scatterbrain): FAVOR+ features are unbiased, full support is exact attention, and
sparse + low-rank beats each part alone on clustered keys."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lorakit.compress.scatterbrain import (
    ScatterbrainAttention,
    draw_features,
    lsh_support,
    positive_features,
    scatterbrain_attention,
)
from lorakit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def exact(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v


def sparse_only(q: Tensor, k: Tensor, v: Tensor, buckets: int, hashes: int, seed: int) -> Tensor:
    """Reformer-style: exact softmax restricted to the same LSH support."""
    scale = q.shape[-1] ** -0.25
    support = lsh_support(q * scale, k * scale, buckets, hashes, seed)
    scores = (q @ k.transpose(-1, -2) * scale ** 2).masked_fill(~support, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num() @ v


def clustered(seed: int, temp: float = 1.5, t: int = 64, d: int = 16, clusters: int = 8) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g) * temp
    k = centers[torch.randint(0, clusters, (t,), generator=g)] + 0.1 * d ** 0.25 * torch.randn(t, d, generator=g)
    q = centers[torch.randint(0, clusters, (t,), generator=g)] + 0.1 * d ** 0.25 * torch.randn(t, d, generator=g)
    return q, k, torch.randn(t, d, generator=g)


def test_random_features_are_unbiased():
    g = torch.Generator().manual_seed(0)
    q, k = 0.4 * torch.randn(3, 4, generator=g), 0.4 * torch.randn(5, 4, generator=g)
    draws = torch.stack([positive_features(q, w) @ positive_features(k, w).T
                         for w in (draw_features(4, 32, seed) for seed in range(1000))])     # (seeds, 3, 5)
    target = (q @ k.T).exp()
    sem = draws.std(0) / 1000 ** 0.5
    assert (sem < 0.05 * target).all()                           # the average is precise enough to tell ...
    assert ((draws.mean(0) - target).abs() < 4 * sem).all()      # ... and agrees with exp(q k^T)
    assert ((draws[0] - target).abs() > 4 * sem).any()           # one draw alone does not


def test_full_support_is_exact_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 12, 8, generator=g), torch.randn(2, 3, 12, 5)
    assert torch.allclose(scatterbrain_attention(q, k, v, features=4, buckets=1, hashes=1), exact(q, k, v), atol=1e-5)
    band = scatterbrain_attention(k, k, v, 4, 8, 0, window=12)
    assert torch.allclose(band, exact(k, k, v), atol=1e-5)   # a local window covering everything is exact too


def test_sparse_plus_low_rank_beats_each_alone():
    errors = {"scatterbrain": 0.0, "performer": 0.0, "sparse": 0.0}
    for seed in range(8):
        q, k, v = clustered(seed)
        ref = exact(q, k, v)
        outs = {"scatterbrain": scatterbrain_attention(q, k, v, 64, 8, 2, seed),
                "performer": scatterbrain_attention(q, k, v, 64, 8, 0, seed),
                "sparse": sparse_only(q, k, v, 8, 2, seed)}
        for name, out in outs.items():
            errors[name] += float((out - ref).norm() / ref.norm()) / 8
    assert errors["scatterbrain"] < 0.85 * min(errors["performer"], errors["sparse"]), errors


def test_exact_on_support_and_lsh_picks_large_entries():
    q, k, v = clustered(0)
    support = lsh_support(q * 16 ** -0.25, k * 16 ** -0.25, 8, 2, 0)
    dots = q @ k.T
    assert dots[support].mean() > dots[~support].mean() + 1.0    # collisions are the large inner products
    assert 0.05 < support.float().mean() < 0.6


def test_module_shapes_gradients_and_errors():
    layer = ScatterbrainAttention(dim=16, heads=2, features=16, buckets=4, hashes=1, window=2)
    x = torch.randn(3, 7, 16, requires_grad=True)
    out = layer(x)
    assert out.shape == (3, 7, 16) and torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None and layer.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="heads"):
        ScatterbrainAttention(dim=16, heads=3, features=4, buckets=2, hashes=1)
    with pytest.raises(ConfigError, match="buckets"):
        scatterbrain_attention(x, x, x, 4, 0, 1)
