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


def test_mixed_precision_runs_in_the_activations_dtype_with_float32_master_factors():
    """bf16 activations and base, float32 factors and magnitude (a GPU's default): the output is bf16 and within bf16
    rounding of the float64 reference; the factors' gradients come back in float32, close to the exact ones."""
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(16, 32, dtype=torch.float64, generator=g)
    w64 = torch.randn(24, 32, dtype=torch.float64, generator=g) / 6
    a64 = torch.randn(4, 32, dtype=torch.float64, generator=g) / 6
    b64 = torch.randn(24, 4, dtype=torch.float64, generator=g) / 2
    col64 = torch.rand(24, dtype=torch.float64, generator=g).add(0.5)
    exact = [t.clone().requires_grad_(True) for t in (a64, b64, col64)]
    reference = exact[2] * (x64 @ w64.t() + 0.5 * (x64 @ exact[0].t()) @ exact[1].t())
    reference.square().sum().backward()
    a, b, col = (t.float().requires_grad_(True) for t in (a64, b64, col64))
    out = lora_linear(x64.bfloat16(), w64.bfloat16(), None, a, b, 0.5, col)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference.detach(), rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    for mine, ref in zip((a, b, col), exact):
        assert mine.grad.dtype == torch.float32
        assert torch.linalg.vector_norm(mine.grad.double() - ref.grad) <= 0.03 * torch.linalg.vector_norm(ref.grad)


def test_float32_adapters_on_a_bf16_base_fuse_on_accelerators_only():
    import lorakit
    from lorakit.hosts.host import hosts

    model = torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False)).to(torch.bfloat16)
    lorakit.adapt(model, lorakit.build_config("dora", r=2, targets=("0",)), "default", dtype=torch.float32)
    host = next(hosts(model))
    adapter, base = host.adapters["default"], host.backend
    assert adapter.a.dtype == torch.float32
    assert not adapter.fused_usable(torch.ones(1, 8, dtype=torch.bfloat16), base)  # CPU: the exact float32 path
    assert adapter.fused_usable(torch.ones(1, 8, dtype=torch.bfloat16, device="meta"), base)
    assert not adapter.fused_usable(torch.ones(1, 8, dtype=torch.float32, device="meta"), base)  # x must match W
