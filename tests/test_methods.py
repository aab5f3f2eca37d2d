"""Each built-in method's defining formula, checked against an obvious dense computation."""
from __future__ import annotations

import pytest
import torch
from zoo import Net, net, perturb

import lorakit


def only_adapter(model):
    host = next(lorakit.inject.hosts(model))
    return host, host.adapters["default"]


@pytest.mark.parametrize("layer", ["linear", "gpt2_conv1d", "conv2d", "conv3d"])
def test_dora_norm_and_merged_weight_match_the_paper_formula(layer):
    model, x = net(layer)
    lorakit.adapt(model, lorakit.DoraConfig(targets=["layer"], r=3, alpha=5))
    perturb(model)
    host, dora = only_adapter(model)
    w = host.backend.weight().detach().double()
    dense = w + dora.scale * dora.geometry.compose(dora.b, dora.a).detach().double()
    norm = dense.reshape(dense.shape[0], -1).norm(dim=1)
    torch.testing.assert_close(dora.column_norm(host.backend).double(), norm, atol=1e-5, rtol=1e-5)
    m = dora.lora_magnitude_vector.detach().double().reshape(-1)
    expected = (m / norm).reshape(-1, *([1] * (w.dim() - 1))) * dense
    torch.testing.assert_close(dora.delta_weight(host.backend).double() + w, expected, atol=1e-5, rtol=1e-5)


def test_dora_magnitude_starts_at_the_base_row_norms():
    model, _ = net("linear")
    lorakit.adapt(model, lorakit.DoraConfig(targets=["layer"]))
    _, dora = only_adapter(model)
    torch.testing.assert_close(dora.lora_magnitude_vector, model.layer.base_layer.weight.norm(dim=1))


@pytest.mark.parametrize("layer", ["linear", "conv2d", "embedding"])
def test_lora_delta_is_scaled_b_times_a(layer):
    model, x = net(layer)
    lorakit.adapt(model, lorakit.LoraConfig(targets=["layer"], r=2, alpha=3))
    perturb(model)
    host, lora = only_adapter(model)
    delta = lora.delta_weight(host.backend)
    b, a = lora.b.reshape(lora.b.shape[0], -1), lora.a.reshape(2, -1)
    product = (b @ a) * 1.5
    expected = product.t() if layer == "embedding" else product.reshape(delta.shape)
    torch.testing.assert_close(delta, expected)
    b_eff, a_eff = lora.factors()
    torch.testing.assert_close((b_eff @ a_eff).reshape(delta.shape), delta)


def test_lora_fa_trains_b_only_and_keeps_a_fixed():
    model, x = net("linear")
    lorakit.adapt(model, lorakit.LoraFAConfig(targets=["layer"], r=4))
    _, adapter = only_adapter(model)
    a_before = adapter.a.detach().clone()
    assert set(lorakit.trainable_parameters(model)) == {"layer.adapters.default.lora_B.weight"}
    opt = torch.optim.SGD(lorakit.trainable_parameters(model).values(), lr=0.1)
    model.train()
    model(x).pow(2).mean().backward()
    opt.step()
    assert torch.equal(adapter.a, a_before) and adapter.b.abs().sum() > 0


def test_gaussian_init_and_kaiming_default_are_identity_with_random_a():
    for init in ("kaiming", "gaussian"):
        model, _ = net("linear")
        lorakit.adapt(model, lorakit.LoraConfig(targets=["layer"], init=init, r=4))
        _, lora = only_adapter(model)
        assert lora.a.abs().sum() > 0 and lora.b.abs().sum() == 0
    model = Net(torch.nn.Linear(256, 64))
    lorakit.adapt(model, lorakit.LoraConfig(targets=["layer"], init="gaussian", r=8))
    assert only_adapter(model)[1].a.std().item() == pytest.approx(1 / 8, rel=0.05)


def test_lora_bias_merges_into_the_base_bias():
    model, x = net("linear")
    lorakit.adapt(model, lorakit.LoraConfig(targets=["layer"], lora_bias=True, init="random"))
    perturb(model)
    out = model(x)
    bias_before = model.layer.base_layer.bias.detach().clone()
    lorakit.merge(model)
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    torch.testing.assert_close(model.layer.base_layer.bias, bias_before, atol=1e-6, rtol=1e-6)


def test_dropout_applies_in_training_only():
    model, x = net("linear")
    lorakit.adapt(model, lorakit.LoraConfig(targets=["layer"], dropout=0.5, init="random"))
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
