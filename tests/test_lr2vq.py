"""LR²VQ (lorakit.compress.lr2vq): the compression-ratio formula, a trained layer beating plain k-means VQ of the
dense weight at the same ratio, codes in range, and straight-through gradients."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lorakit.compress.lr2vq import LR2VQLinear, kmeans
from lorakit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

OUT, IN, M, D = 64, 64, 8, 2
SCALE = torch.linspace(2.0, 0.1, IN)          # anisotropic inputs: the task weighs the weight's columns unevenly


def low_rank_target(seed: int = 0) -> Tensor:
    """A weight whose (N, m) subvector matrix has rank D, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    n = OUT * IN // M
    w = (torch.randn(n, D, generator=g) @ torch.randn(D, M, generator=g)).reshape(OUT, IN) / 8
    return w + 0.002 * torch.randn(OUT, IN, generator=g)


def task_error(weight: Tensor, target: Tensor) -> float:
    """Relative output error E|(W - W*) x| / E|W* x| for x ~ N(0, diag(SCALE^2))."""
    return float(((weight - target) * SCALE).norm() / (target * SCALE).norm())


def linear_of(weight: Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.zero_()
    return layer


def test_compression_ratio_formula():
    layer = LR2VQLinear(32, 64, subvector=8, dim=2, clusters=16)
    n = 64 * 32 // 8
    assert layer.codes.numel() == n == 256
    assert layer.compression_ratio() == pytest.approx(32 * 64 * 32 / (n * 4 + 32 * (16 * 2 + 2 * 8)))
    ratios = [LR2VQLinear(128, 64, subvector=m, dim=2, clusters=16).compression_ratio() for m in (4, 8, 16)]
    assert ratios[0] < ratios[1] < ratios[2]                       # m controls the ratio
    assert layer.weight().shape == (64, 32)


def test_svd_start_reproduces_the_layer_at_full_dim():
    dense = linear_of(torch.randn(12, 8))
    layer = LR2VQLinear.from_linear(dense, subvector=4, dim=4, clusters=3)
    x = torch.randn(5, 8)
    assert torch.allclose(layer(x), dense(x), atol=1e-5)


def test_trained_layer_beats_plain_vq_at_the_same_ratio():
    target = low_rank_target()
    layer = LR2VQLinear.from_linear(linear_of(target), subvector=M, dim=D, clusters=200)
    layer.quantize(seed=0)
    start = task_error(layer.weight().detach(), target)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        x = torch.randn(64, IN, generator=g) * SCALE
        loss = (layer(x) - x @ target.T).pow(2).mean() + layer.commitment_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = task_error(layer.weight().detach(), target)
    assert trained < 0.95 * start                                  # end-to-end fine-tuning helps the task

    ratio, n = layer.compression_ratio(), OUT * IN // M

    def plain_ratio(k: int) -> float:
        return 32 * OUT * IN / (n * math.ceil(math.log2(k)) + 32 * k * M)
    k_plain = max(k for k in range(2, n + 1) if plain_ratio(k) >= ratio)   # plain VQ's best k at >= the ratio
    centroids, codes = kmeans(target.reshape(n, M), k_plain, seed=0)
    plain = task_error(centroids[codes].reshape(OUT, IN), target)
    assert trained < 0.5 * plain, (trained, plain, k_plain)


def test_codes_are_integers_in_range():
    layer = LR2VQLinear.from_linear(linear_of(low_rank_target()), subvector=M, dim=D, clusters=50)
    layer.quantize()
    layer.train()
    with torch.no_grad():
        layer.latent.add_(torch.randn_like(layer.latent))         # move Z: the training forward re-assigns
    before = layer.codes.clone()
    layer(torch.randn(3, IN))
    codes = layer.codes
    assert codes.dtype == torch.int64 and int(codes.min()) >= 0 and int(codes.max()) < 50
    assert not torch.equal(codes, before)
    assert torch.equal(codes, torch.cdist(layer.latent.detach(), layer.codebook.detach()).argmin(1))


def test_straight_through_gradients_reach_codebook_and_latent():
    layer = LR2VQLinear.from_linear(linear_of(low_rank_target()), subvector=M, dim=D, clusters=20)
    layer.quantize()
    layer.eval()
    layer(torch.randn(4, IN)).pow(2).sum().backward()
    assert layer.codebook.grad.abs().sum() > 0 and layer.basis.grad.abs().sum() > 0
    # the value is C[codes]; Z gets the same gradient (identity through the quantiser), which sums into C's rows
    summed = torch.zeros_like(layer.codebook).index_add_(0, layer.codes, layer.latent.grad)
    assert torch.allclose(layer.codebook.grad, summed, atol=1e-6)
    assert torch.allclose(layer.weight(), (layer.codebook[layer.codes] @ layer.basis).reshape(OUT, IN),
                          atol=1e-6)
    layer.zero_grad()
    layer.commitment_loss().backward()
    assert layer.codebook.grad is None or layer.codebook.grad.abs().sum() == 0   # commitment moves Z only
    assert layer.latent.grad.abs().sum() > 0


def test_invalid_hyper_parameters():
    with pytest.raises(ConfigError, match="subvector"):
        LR2VQLinear(10, 3, subvector=4, dim=2, clusters=2)
    with pytest.raises(ConfigError, match="dim"):
        LR2VQLinear(8, 4, subvector=4, dim=5, clusters=2)
    with pytest.raises(ConfigError, match="clusters"):
        LR2VQLinear(8, 4, subvector=4, dim=2, clusters=9)
