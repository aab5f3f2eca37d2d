"""The contract every registered method honours on every layer type it declares.

Parametrized over the method registry: registering a method puts it under these tests.
"""
from __future__ import annotations

import pytest
import torch
from zoo import KIND, LAYERS, net, perturb

import lorakit
from lorakit.methods import METHODS

CASES = [
    (method, layer)
    for method in METHODS.names()
    for layer in LAYERS
    if KIND[layer] in METHODS.get(method)[0].capabilities.layers
]
UNSUPPORTED = [
    (method, layer)
    for method in METHODS.names()
    for layer in LAYERS
    if KIND[layer] not in METHODS.get(method)[0].capabilities.layers
]


def config(method: str, **fields):
    return lorakit.build_config(method, targets=["layer"], **fields)


def adapted(method: str, layer: str, names=("default",)):
    model, x = net(layer)
    base_out = model(x).detach()
    base_weight = model.layer.weight.detach().clone()
    for name in names:
        lorakit.adapt(model, config(method), name)
    return model, x, base_out, base_weight


@pytest.mark.parametrize("method,layer", CASES)
def test_identity_at_init(method, layer):
    model, x, base_out, _ = adapted(method, layer)
    if METHODS.get(method)[0].capabilities.identity_at_init:
        torch.testing.assert_close(model(x), base_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,layer", CASES)
def test_merge_unmerge_disable(method, layer):
    model, x, base_out, base_weight = adapted(method, layer)
    perturb(model)
    out = model(x).detach()
    assert (out - base_out).abs().max() > 1e-3, "perturbed adapter must change the output"
    with lorakit.disable(model):
        torch.testing.assert_close(model(x), base_out, atol=0, rtol=0)
    torch.testing.assert_close(model(x), out, atol=0, rtol=0)
    lorakit.merge(model)
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    torch.testing.assert_close(model.layer.base_layer.weight, base_weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    lorakit.unload(model, merge_active=True)
    assert isinstance(model.layer, type(net(layer)[0].layer))
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,layer", CASES)
def test_save_load_identical(method, layer, tmp_path):
    model, x, _, _ = adapted(method, layer)
    perturb(model)
    out = model(x)
    lorakit.save_adapter(model, tmp_path)
    fresh, _ = net(layer)
    lorakit.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(x), out)
    assert type(lorakit.configs(fresh)["default"]) is type(lorakit.configs(model)["default"])


@pytest.mark.parametrize("method,layer", CASES)
def test_only_declared_tensors_get_gradients(method, layer):
    model, x, _, _ = adapted(method, layer)
    perturb(model)
    model.train()
    out = model(x)
    out.float().pow(2).mean().backward()
    declared = {id(p) for p in lorakit.trainable_parameters(model).values()}
    assert declared, "a method must train something"
    for name, p in model.named_parameters():
        if id(p) in declared:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} declared trainable but got no gradient"
        else:
            assert p.grad is None and not p.requires_grad, f"{name} is not declared trainable but got a gradient"


@pytest.mark.parametrize("method,layer", CASES)
def test_mixed_batch_equals_rows_alone(method, layer):
    model, x, _, _ = adapted(method, layer, names=("a", "b"))
    perturb(model)
    model.train()
    names = ["a", "b", None, "a"]
    weights = torch.randn_like(model(x).float())
    params = lorakit.trainable_parameters(model)

    with lorakit.route(model, names):
        routed = model(x)
    (routed.float() * weights).sum().backward()
    routed_grads = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
    model.zero_grad()

    for i, name in enumerate(names):
        if name is None:
            with lorakit.disable(model):
                row = model(x[i : i + 1])
        else:
            lorakit.set_active(model, name)
            row = model(x[i : i + 1])
        torch.testing.assert_close(routed[i : i + 1], row, atol=1e-5, rtol=1e-5)
        if name is not None:  # a base-model row has no adapter to differentiate
            (row.float() * weights[i : i + 1]).sum().backward()
    alone_grads = {k: p.grad for k, p in params.items() if p.grad is not None}
    assert routed_grads.keys() == alone_grads.keys()
    assert any(".a." in k for k in routed_grads) and any(".b." in k for k in routed_grads)
    for key in routed_grads:
        torch.testing.assert_close(routed_grads[key], alone_grads[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS.names())
def test_bad_configs_raise_clear_errors(method):
    with pytest.raises(lorakit.ConfigError, match="targets"):
        lorakit.build_config(method, targets=[])
    with pytest.raises(lorakit.ConfigError, match="targets"):
        lorakit.build_config(method, targets="(unclosed")
    with pytest.raises(lorakit.ConfigError, match="exclude"):
        lorakit.build_config(method, exclude="all-linear")
    with pytest.raises(TypeError):
        lorakit.build_config(method, no_such_field=1)


@pytest.mark.parametrize("method,layer", UNSUPPORTED)
def test_unsupported_layer_is_a_clear_error(method, layer):
    model, _ = net(layer)
    with pytest.raises(lorakit.LorakitError, match=f"does not support {KIND[layer]} layers"):
        lorakit.adapt(model, config(method))
    assert not list(lorakit.inject.hosts(model)), "a failed adapt must leave the model untouched"
