"""Compacter's paper form (Karimi Mahabadi et al., 2021; METHODS.md entry 2): the serial bottleneck adapter
``h = y + U GeLU(D y)`` on a layer's output ``y``, with ``D``, ``U`` sums of Kronecker products ``sum_i A_i kron
(s_i t_i^T)`` and the rules ``A_i`` shared by every layer; checked against references written out here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import Net, perturb, tiny_llama

import lorakit
from lorakit.methods.compacter import CompacterConfig

PAPER = CompacterConfig(r=8, n=4, form="paper")


def adapted(layer: nn.Module, config: CompacterConfig):
    torch.manual_seed(0)
    model = lorakit.adapt(Net(layer), config.replace(targets=["layer"]))
    host = model.layer
    return model, host, host.adapters["default"]


def kron_sum(rule: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum_i A_i kron (s_i t_i^T)`` with explicit ``torch.kron``."""
    return sum(torch.kron(rule[i], torch.outer(s[i], t[i])) for i in range(rule.shape[0]))


def paper_reference(host, adapter, x: torch.Tensor) -> torch.Tensor:
    """``y + U GeLU(D y)`` with ``y = base(x)``, ``D: (k, d_out)`` and ``U: (d_out, k)`` built densely."""
    rule = adapter.shared.phm_rule.detach()
    down = kron_sum(rule, adapter.phm_down_s.detach(), adapter.phm_down_t.detach())
    up = kron_sum(rule, adapter.phm_up_s.detach(), adapter.phm_up_t.detach())
    assert down.shape == (8, 16) and up.shape == (16, 8)
    y = host.base_layer(x)
    return y + F.gelu(y @ down.t()) @ up.t()


def contribution(model, host, x: torch.Tensor) -> torch.Tensor:
    return model(x) - host.base_layer(x)


def test_paper_form_is_the_serial_kronecker_bottleneck_with_gelu():
    model, host, adapter = adapted(nn.Linear(24, 16), PAPER)
    perturb(model)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(model(x), paper_reference(host, adapter, x), atol=1e-5, rtol=1e-5)


def test_paper_form_is_the_identity_at_init_and_declares_itself_non_mergeable():
    model, host, adapter = adapted(nn.Linear(24, 16), PAPER)
    x = torch.randn(3, 24)
    torch.testing.assert_close(model(x), host.base_layer(x), atol=0, rtol=0)
    assert not adapter.capabilities.mergeable and not adapter.capabilities.factorable
    assert adapter.capabilities.identity_at_init and adapter.factors() is None


def test_the_paper_form_is_the_default_and_the_parallel_form_is_the_mergeable_variant():
    assert lorakit.build_config("compacter") == CompacterConfig(form="paper")
    _, _, default = adapted(nn.Linear(24, 16), CompacterConfig(r=8, n=4))
    assert default.phm_down_t.shape == (4, 16 // 4)  # D reads the layer's output (d_out=16), not its input (24)
    assert not default.capabilities.mergeable and not default.capabilities.factorable
    _, host, parallel = adapted(nn.Linear(24, 16), CompacterConfig(r=8, n=4, form="parallel"))
    assert parallel.phm_down_t.shape == (4, 24 // 4)
    assert parallel.capabilities.mergeable and parallel.capabilities.factorable
    up, down = parallel.factors()
    torch.testing.assert_close(up @ down, parallel.delta_weight(host.backend))


@pytest.mark.parametrize("form,linear", [("paper", False), ("parallel", True)])
def test_only_the_paper_form_is_non_linear_in_the_input(form, linear):
    model, host, _ = adapted(nn.Linear(24, 16, bias=False), CompacterConfig(r=8, n=4, form=form))
    perturb(model)
    x = torch.randn(4, 24)
    twice, doubled = contribution(model, host, 2 * x), 2 * contribution(model, host, x)
    assert doubled.abs().max() > 1e-2
    assert torch.allclose(twice, doubled, atol=1e-5, rtol=1e-5) is linear


def test_merging_the_paper_form_is_refused_and_leaves_the_model_alone():
    model, host, adapter = adapted(nn.Linear(24, 16), PAPER)
    perturb(model)
    x = torch.randn(3, 24)
    out, weight = model(x).detach(), host.base_layer.weight.detach().clone()
    with pytest.raises(lorakit.LorakitError, match="cannot be merged"):
        lorakit.merge(model)
    with pytest.raises(lorakit.LorakitError, match="form='paper'.*non-linear"):
        adapter.delta_weight(host.backend)
    assert torch.equal(host.base_layer.weight, weight)
    torch.testing.assert_close(model(x), out, atol=0, rtol=0)


def test_the_shared_rules_get_gradients_from_every_layer():
    model = lorakit.adapt(tiny_llama(), PAPER.replace(r=4, n=2))
    perturb(model)
    rule = lorakit.inject.shared_states(model)["default"].phm_rule
    layers = [(h, h.adapters["default"]) for h in lorakit.inject.hosts(model) if "default" in h.adapters]
    assert len(layers) > 1 and all(a.shared.phm_rule is rule for _, a in layers)
    assert all("phm_rule" not in dict(a.named_parameters()) for _, a in layers)  # held once, not per layer
    calls = {}
    hooks = [a.register_forward_hook(lambda m, args, out, h=h: calls.__setitem__(h.path, args)) for h, a in layers]
    ids = torch.randint(0, 96, (2, 8))
    model(ids).logits.square().mean().backward()
    for hook in hooks:
        hook.remove()
    assert rule.grad is not None and rule.grad.abs().sum() > 0
    for h, a in layers:  # each layer's own contribution (inputs cut from the rest of the graph) depends on the rule
        x, base_out, backend = calls[h.path]
        (grad,) = torch.autograd.grad(a(x.detach(), base_out.detach(), backend).square().sum(), rule)
        assert grad.abs().sum() > 0, h.path


def test_paper_form_saves_and_loads_back_identically(tmp_path):
    model = lorakit.adapt(tiny_llama(), PAPER)
    perturb(model)
    lorakit.save_adapter(model, tmp_path)
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert lorakit.configs(loaded)["default"].form == "paper"
    ids = torch.randint(0, 96, (2, 8))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_what_needs_a_weight_update_refuses_the_default_form_clearly(tmp_path):
    """Merging into the base, unloading merged, exporting as a LoRA and merging adapters into a new LoRA all need
    ``dW``, which the default (paper) form does not have: each is refused with a LorakitError, the model untouched."""
    from lorakit.merging.model import merge_adapters

    model = lorakit.adapt(tiny_llama(), CompacterConfig(r=4, n=2))
    perturb(model)
    ids = torch.randint(0, 96, (2, 8))
    before = model(ids).logits.detach()
    with pytest.raises(lorakit.LorakitError, match="cannot be merged"):
        lorakit.merge(model)
    with pytest.raises(lorakit.LorakitError, match="cannot be merged"):
        lorakit.unload(model, merge_active=True)
    with pytest.raises(lorakit.LorakitError, match="exactly low rank"):
        lorakit.export_lora(model, tmp_path)
    with pytest.raises(lorakit.LorakitError, match="form='parallel'"):
        merge_adapters(model, ["default"])
    assert list(lorakit.configs(model)) == ["default"] and not any(h.merged for h in lorakit.inject.hosts(model))
    assert torch.equal(model(ids).logits, before)
