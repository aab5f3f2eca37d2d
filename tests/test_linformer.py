"""Linformer beside LRT (lorakit.compress.linformer; Greenformers, METHODS.md entry 68): identity projections give
exact attention, the multiply-add formulas match hand counts, and the crossover separates who saves more."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lorakit.compress.linformer import (
    LinformerSelfAttention,
    attention_flops,
    crossover,
    linformer_attention,
    lrt_linear_flops,
)
from lorakit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def exact(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v


def qkv(b: int = 2, h: int = 3, t: int = 7, d: int = 4, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, t, d, generator=g) for _ in range(3))


def test_identity_projections_give_exact_attention():
    q, k, v = qkv()
    eye = torch.eye(7)
    torch.testing.assert_close(linformer_attention(q, k, v, eye, eye), exact(q, k, v), atol=1e-5, rtol=1e-5)


def test_module_with_identity_projections_is_dense_self_attention():
    torch.manual_seed(0)
    layer = LinformerSelfAttention(dim=8, heads=2, seq_len=5, k_proj=5)
    with torch.no_grad():
        layer.e.copy_(torch.eye(5))
        layer.f.copy_(torch.eye(5))
    x = torch.randn(3, 5, 8)                                               # (B, T, dim)

    def split(y: Tensor) -> Tensor:
        return y.view(3, 5, 2, 4).transpose(1, 2)                          # (B, H, T, d)

    mixed = exact(split(layer.q(x)), split(layer.k(x)), split(layer.v(x))).transpose(1, 2).reshape(3, 5, 8)
    torch.testing.assert_close(layer(x), layer.o(mixed), atol=1e-5, rtol=1e-5)


def test_module_shapes_and_projection_init():
    torch.manual_seed(0)
    layer = LinformerSelfAttention(dim=8, heads=2, seq_len=400, k_proj=16)
    assert layer(torch.randn(2, 400, 8)).shape == (2, 400, 8)
    assert layer.e.shape == layer.f.shape == (16, 400)
    assert abs(layer.e.var().item() - 1 / 16) < 0.01                      # N(0, 1/k_proj)
    assert all(isinstance(getattr(layer, n), torch.nn.Linear) for n in "qkvo")


def test_attention_flops_match_hand_counts():
    # T=3, d=2: Q K^T is 3x3 scores of 2 products each, A V is 3x2 outputs of 3 products each.
    assert attention_flops(3, 2) == 3 * 3 * 2 + 3 * 2 * 3 == 36
    # T=6, d=2, k=2: E K (2x2 of 6), F V (2x2 of 6), Q (EK)^T (6x2 of 2), A (FV) (6x2 of 2).
    assert attention_flops(6, 2, k_proj=2) == 2 * 2 * 6 + 2 * 2 * 6 + 6 * 2 * 2 + 6 * 2 * 2 == 96


def test_lrt_flops_match_hand_counts():
    assert lrt_linear_flops(3, 4, 5) == 3 * (4 * 5) == 60                  # 5 outputs of 4 products per token
    assert lrt_linear_flops(3, 4, 5, rank=2) == 3 * (2 * 4 + 5 * 2) == 54  # down: 2 of 4, up: 5 of 2


@pytest.mark.parametrize("dim, k_proj, rank", [(256, 64, 64), (64, 16, 8), (512, 128, 32)])
def test_crossover_separates_the_savings(dim: int, k_proj: int, rank: int):
    def linformer_saving(t: int) -> int:
        return attention_flops(t, dim) - attention_flops(t, dim, k_proj)

    def lrt_saving(t: int) -> int:
        return 4 * (lrt_linear_flops(t, dim, dim) - lrt_linear_flops(t, dim, dim, rank))  # q, k, v, o

    t_star = crossover(dim, k_proj, rank)
    assert t_star > 1
    for t in (1, t_star // 2, t_star - 1):
        assert lrt_saving(t) > linformer_saving(t)
    assert lrt_saving(t_star) == linformer_saving(t_star)
    for t in (t_star + 1, 2 * t_star, 10 * t_star):
        assert linformer_saving(t) > lrt_saving(t)


def test_crossover_at_or_below_zero_when_lrt_saves_nothing():
    assert crossover(dim=16, k_proj=4, rank=16) <= 0
    assert attention_flops(1, 16) - attention_flops(1, 16, 4) > 4 * (lrt_linear_flops(1, 16, 16)
                                                                     - lrt_linear_flops(1, 16, 16, 16))


def test_bad_shapes_raise_clear_errors():
    q, k, v = qkv(t=7)
    with pytest.raises(ConfigError, match=r"e=\(3, 6\) is invalid: must be \(k_proj, T=7\)"):
        linformer_attention(q, k, v, torch.randn(3, 6), torch.randn(3, 7))
    with pytest.raises(ConfigError, match="same k_proj"):
        linformer_attention(q, k, v, torch.randn(3, 7), torch.randn(2, 7))
    with pytest.raises(ConfigError, match="q, k, v"):
        linformer_attention(q, k[..., :5, :], v, torch.randn(3, 7), torch.randn(3, 7))
    layer = LinformerSelfAttention(dim=8, heads=2, seq_len=5, k_proj=3)
    with pytest.raises(ConfigError, match="seq_len=5"):
        layer(torch.randn(1, 6, 8))
    with pytest.raises(ConfigError, match="heads"):
        LinformerSelfAttention(dim=8, heads=3, seq_len=5, k_proj=3)
    with pytest.raises(ConfigError, match="rank"):
        crossover(64, 16, 0)
