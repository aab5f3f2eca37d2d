"""The contract every registered method honours on every layer type it declares.

Parametrized over the method registry and, for a method with several forms (a ``form`` field), over each form: the
default config and every other form's (:func:`zoo.forms`). What a variant can do (its layers, whether it merges, ...)
is read from the adapter it builds, never from the registered class: registering a method puts it under these tests.
"""
from __future__ import annotations

import pytest
import torch
from zoo import KIND, LAYERS, built_capabilities, form_config, forms, net, perturb, variant_id

import lorakit
from lorakit.errors import LorakitError
from lorakit.methods import METHODS

VARIANTS = [(method, form) for method in METHODS.names() for form in forms(method)]
CASES = [
    pytest.param(method, form, layer, id=variant_id(method, form, layer))
    for method, form in VARIANTS
    for layer in LAYERS
    if KIND[layer] in built_capabilities(method, form).layers
]
UNSUPPORTED = [
    pytest.param(method, form, layer, id=variant_id(method, form, layer))
    for method, form in VARIANTS
    for layer in LAYERS
    if KIND[layer] not in built_capabilities(method, form).layers
]


def adapted(method: str, form: str | None, layer: str, names=("default",)):
    model, x = net(layer)
    base_out = model(x).detach()
    base_weight = model.layer.weight.detach().clone()
    for name in names:
        lorakit.adapt(model, form_config(method, form), name)
    return model, x, base_out, base_weight


def test_every_form_of_a_method_is_under_the_contract():
    """Each variant's config has its own form, and together they are every form its config class lists (a ``form``
    field without ``FORMS`` would leave the non-default forms untested)."""
    for method in METHODS.names():
        tested = [getattr(form_config(method, form), "form", None) for form in forms(method)]
        assert sorted(tested, key=str) == sorted(getattr(METHODS.get(method)[1], "FORMS", (None,)), key=str), method


def test_a_form_that_builds_another_class_fits_the_registered_layers():
    """``adapt`` refuses layer types by the registered class's capabilities, before building: every variant's own
    layer types must lie within them, or it would be refused on layers it supports."""
    for method, form in VARIANTS:
        assert built_capabilities(method, form).layers <= METHODS.get(method)[0].capabilities.layers, (method, form)


@pytest.mark.parametrize("method,form,layer", CASES)
def test_identity_at_init(method, form, layer):
    model, x, base_out, _ = adapted(method, form, layer)
    if model.layer.adapters["default"].capabilities.identity_at_init:
        torch.testing.assert_close(model(x), base_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,form,layer", CASES)
def test_merge_unmerge_disable(method, form, layer):
    model, x, base_out, base_weight = adapted(method, form, layer)
    perturb(model)
    out = model(x).detach()
    assert (out - base_out).abs().max() > 1e-3, "perturbed adapter must change the output"
    with lorakit.disable(model):
        torch.testing.assert_close(model(x), base_out, atol=0, rtol=0)
    torch.testing.assert_close(model(x), out, atol=0, rtol=0)
    # not mergeable: input-dependent (SMoRA's gate) or non-linear (the paper forms of Compacter, MoSA) updates
    if not model.layer.adapters["default"].capabilities.mergeable:
        with pytest.raises(LorakitError, match="cannot be merged"):
            lorakit.merge(model)
        torch.testing.assert_close(model(x), out, atol=0, rtol=0)  # refused before anything changed
        return
    lorakit.merge(model)
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    torch.testing.assert_close(model.layer.base_layer.weight, base_weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    lorakit.unload(model, merge_active=True)
    assert isinstance(model.layer, type(net(layer)[0].layer))
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,form,layer", CASES)
def test_save_load_identical(method, form, layer, tmp_path):
    model, x, _, _ = adapted(method, form, layer)
    perturb(model)
    out = model(x)
    lorakit.save_adapter(model, tmp_path)
    fresh, _ = net(layer)
    lorakit.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(x), out)
    assert lorakit.configs(fresh)["default"] == lorakit.configs(model)["default"]


@pytest.mark.parametrize("method,form,layer", CASES)
def test_only_declared_tensors_get_gradients(method, form, layer):
    model, x, _, _ = adapted(method, form, layer)
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


@pytest.mark.parametrize("method,form,layer", CASES)
def test_mixed_batch_equals_rows_alone(method, form, layer):
    model, x, _, _ = adapted(method, form, layer, names=("a", "b"))
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


@pytest.mark.parametrize("method,form,layer", UNSUPPORTED)
def test_unsupported_layer_is_a_clear_error(method, form, layer):
    model, _ = net(layer)
    with pytest.raises(lorakit.LorakitError, match=f"does not support {KIND[layer]} layers"):
        lorakit.adapt(model, form_config(method, form))
    assert not list(lorakit.inject.hosts(model)), "a failed adapt must leave the model untouched"


def token_weights(layer: str, x: torch.Tensor, n: int) -> torch.Tensor:
    """Random weights per token (per row on conv layers), about half of them exactly zero."""
    tokens = x.shape[:1] if KIND[layer] == "conv" else (x.shape[:-1] if x.is_floating_point() else x.shape)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(*tokens, n, generator=gen) * (torch.rand(*tokens, n, generator=gen) > 0.5)
    return w.requires_grad_(True)


WEIGHTED_CASES = [
    pytest.param(*case.values, "sparse", id=f"{case.id}-sparse") for case in CASES
] + [pytest.param(*case.values, "dense", id=f"{case.id}-dense") for case in CASES if case.values[2] == "linear"]


@pytest.mark.parametrize("method,form,layer,dispatch", WEIGHTED_CASES)
def test_weighted_mix_equals_the_per_token_reference(method, form, layer, dispatch):
    """``mix``: ``base + sum_i w_i (y_i - base)`` per token, ``y_i`` the output with only adapter ``i`` active;
    outputs and gradients (adapters and the weights themselves, where routed) equal that dense reference."""
    names = ["a", "b", "c"]
    model, x, _, _ = adapted(method, form, layer, names=tuple(names))
    perturb(model)
    model.train()
    w = token_weights(layer, x, len(names))
    params = lorakit.trainable_parameters(model)
    probe = torch.randn_like(model(x).float())

    with lorakit.mix(model, names, w, dispatch=dispatch):
        mixed = model(x)
    (mixed.float() * probe).sum().backward()
    mixed_grads = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
    mixed_w_grad, w.grad = w.grad.clone(), None
    model.zero_grad()

    with lorakit.disable(model):
        base = model(x)
    reference = base
    for i, name in enumerate(names):
        lorakit.set_active(model, name)
        wi = w[..., i].reshape(*w.shape[:-1], *([1] * (base.dim() - w.dim() + 1)))
        reference = reference + wi * (model(x) - base)
    (reference.float() * probe).sum().backward()
    torch.testing.assert_close(mixed, reference, atol=1e-5, rtol=1e-5)
    reference_grads = {k: p.grad for k, p in params.items() if p.grad is not None}
    assert mixed_grads.keys() == reference_grads.keys() and any(".c." in k for k in mixed_grads)
    for key in mixed_grads:
        torch.testing.assert_close(mixed_grads[key], reference_grads[key], atol=1e-5, rtol=1e-4)
    routed = w.detach() != 0 if dispatch == "sparse" else torch.ones_like(w, dtype=torch.bool)
    torch.testing.assert_close(mixed_w_grad[routed], w.grad[routed], atol=1e-4, rtol=1e-4)
    assert not mixed_w_grad[~routed].any()  # sparse: a zero weight is no route, and gets no gradient
