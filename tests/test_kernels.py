"""The fused LoRA linear autograd function against the plain composition, in float64."""
from __future__ import annotations

import torch

from lorakit.kernels.lora_linear import lora_linear


def test_fused_lora_linear_matches_reference_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 7, dtype=torch.float64, generator=g)
    bias = torch.randn(6, dtype=torch.float64, generator=g)
    a = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    reference = x @ w.t() + bias + 0.7 * (x @ a.t()) @ b.t()
    torch.testing.assert_close(lora_linear(x, w, bias, a, b, 0.7), reference)
    assert torch.autograd.gradcheck(lambda x_, a_, b_: lora_linear(x_, w, bias, a_, b_, 0.7), (x, a, b))


def test_fused_lora_linear_with_frozen_a_and_trainable_bias():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 7, dtype=torch.float64, generator=g)
    bias = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(3, 7, dtype=torch.float64, generator=g)
    b = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, bias_, b_: lora_linear(x_, w, bias_, a, b_, 2.0), (x, bias, b))


def test_fused_dora_column_scale_matches_reference_values_and_gradients():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 7, dtype=torch.float64, generator=g)
    bias = torch.randn(6, dtype=torch.float64, generator=g)
    a = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    col = torch.rand(6, dtype=torch.float64, generator=g).add(0.5).requires_grad_(True)
    reference = col * (x @ w.t() + 0.5 * (x @ a.t()) @ b.t()) + bias
    torch.testing.assert_close(lora_linear(x, w, bias, a, b, 0.5, col), reference)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(t[0], w, bias, t[1], t[2], 0.5, t[3]), (x, a, b, col))
