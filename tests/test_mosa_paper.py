"""MoSA's paper form (Zhang et al. 2023, "Split & Merge"; METHODS.md entry 16): a serial bottleneck adapter on the
host output, split into disjoint sparse modules, sampled per step, complete in evaluation, never merged; and the
hierarchical (nested-granularity) sparse strategy. References are written out here."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import Net, perturb

import lorakit
from lorakit.errors import LorakitError
from lorakit.methods.mosa import Mosa, MosaBottleneck, MosaConfig, MosaResample, draw_modules, mosa_resample

D_IN, D_OUT = 12, 10


def adapted(config: MosaConfig, bump: bool = True):
    torch.manual_seed(0)
    model = lorakit.adapt(Net(nn.Linear(D_IN, D_OUT)), config.replace(targets=["layer"]))
    if bump:
        perturb(model)
    host = model.layer
    return model, host, host.adapters["default"]


def reference(x, base_layer, down, up, scale, act=F.relu):
    """``y + s * W_up act(W_down y)`` with ``y = base(x)``, explicit."""
    y = base_layer(x)
    return y + scale * act(y @ down.t()) @ up.t()


def contribution(model, host, x):
    return model(x) - host.base_layer(x)


def test_the_paper_form_is_the_default_and_builds_the_bottleneck():
    assert lorakit.build_config("mosa") == MosaConfig(form="paper")
    _, _, adapter = adapted(MosaConfig(r=4))
    assert type(adapter) is MosaBottleneck
    assert not adapter.capabilities.mergeable and not adapter.capabilities.factorable
    assert adapter.mosa_down.shape == (4, D_OUT) and adapter.mosa_up.shape == (D_OUT, 4)
    _, _, parallel = adapted(MosaConfig(r=4, form="parallel"))
    assert type(parallel) is Mosa and parallel.capabilities.mergeable and parallel.capabilities.factorable
    with pytest.raises(LorakitError):
        MosaConfig(form="serial")


@pytest.mark.parametrize("field,value", [("init", "gaussian"), ("dropout", 0.1), ("lora_bias", True)])
def test_lora_only_options_point_to_the_parallel_form(field, value):
    with pytest.raises(LorakitError, match=f"{field}=.*form='paper' \\(the default.*form='parallel'"):
        MosaConfig(**{field: value})
    assert getattr(MosaConfig(form="parallel", **{field: value}), field) == value


@pytest.mark.parametrize("activation, act", [("relu", F.relu), ("gelu", F.gelu)])
def test_paper_form_equals_the_explicit_bottleneck_on_the_base_output(activation, act):
    model, host, m = adapted(MosaConfig(r=4, alpha=8.0, form="paper", activation=activation))
    x = torch.randn(3, 5, D_IN)
    expected = reference(x, host.base_layer, m.mosa_down.detach(), m.mosa_up.detach(), 2.0, act)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_identity_at_init():
    model, host, m = adapted(MosaConfig(r=4, form="paper"), bump=False)
    assert bool((m.mosa_up == 0).all()) and bool(m.mosa_down.ne(0).any())
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(model(x), host.base_layer(x))


def test_non_linear_in_the_input():
    model, host, _ = adapted(MosaConfig(r=4, form="paper"))
    x1, x2 = torch.randn(4, D_IN), torch.randn(4, D_IN)
    with torch.no_grad():
        lhs = contribution(model, host, x1 + x2)
        rhs = contribution(model, host, x1) + contribution(model, host, x2)
        assert (lhs - rhs).abs().max() > 1e-3
        assert (contribution(model, host, 2 * x1) - 2 * contribution(model, host, x1)).abs().max() > 1e-3


def test_only_sampled_modules_train_and_eval_runs_the_complete_adapter():
    model, host, m = adapted(MosaConfig(r=4, modules=4, form="paper", activation="gelu"))
    model.train()
    mosa_resample(model, k=1, generator=torch.Generator().manual_seed(3))
    down_mask, up_mask = m._masks
    sampled = int(m.mosa_module_down[down_mask][0])
    assert bool((down_mask == (m.mosa_module_down == sampled)).all())  # exactly one module's entries
    assert bool((up_mask == (m.mosa_module_up == sampled)).all())
    assert 0 < int(down_mask.sum()) < down_mask.numel() and m.stochastic
    x = torch.randn(6, D_IN)
    down, up = m.mosa_down.detach(), m.mosa_up.detach()
    masked = reference(x, host.base_layer, down * down_mask, up * up_mask, m.scale, F.gelu)
    out = model(x)
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=1e-5)
    out.pow(2).sum().backward()
    for grad, mask in ((m.mosa_down.grad, down_mask), (m.mosa_up.grad, up_mask)):
        assert bool((grad[~mask] == 0).all()) and bool(grad[mask].ne(0).all())
    model.eval()  # the masks stay set, but evaluation is the complete (merged-modules) adapter
    assert m._masks is not None and not m.stochastic
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x, host.base_layer, down, up, m.scale, F.gelu),
                                   atol=1e-5, rtol=1e-5)


def test_the_training_hook_samples_the_paper_form_and_ends_complete():
    model, _, m = adapted(MosaConfig(r=4, modules=4, form="paper"))
    hook = MosaResample("default", k=2, steps=2, seed=0)
    hook.before_forward(model, 1)
    assert m._masks is not None and int(m._masks[0].sum()) == m.mosa_down.numel() // 2  # 2 of 4 balanced modules
    hook.after_step(model, None, 2)
    assert m._masks is None


def test_merge_is_refused_with_a_clear_error():
    """Of the default (paper) form: merging into the base, unloading merged and merging adapters into a new LoRA."""
    from lorakit.merging.model import merge_adapters

    model, host, m = adapted(MosaConfig(r=4))
    w = host.base_layer.weight.detach().clone()
    with pytest.raises(LorakitError, match="cannot be merged"):
        lorakit.merge(model)
    with pytest.raises(LorakitError, match="cannot be merged"):
        lorakit.unload(model, merge_active=True)
    with pytest.raises(LorakitError, match="form='parallel'"):
        m.merge_delta(None)
    with pytest.raises(LorakitError, match="form='parallel'"):
        merge_adapters(model, ["default"])
    assert list(lorakit.configs(model)) == ["default"]
    assert torch.equal(host.base_layer.weight, w) and not host.merged


def test_export_of_the_default_form_is_refused_clearly(tmp_path):
    model, _, _ = adapted(MosaConfig(r=4))
    with pytest.raises(LorakitError, match="LoRA-family or exactly low rank"):
        lorakit.export_lora(model, tmp_path)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(D_IN, D_OUT)
    fresh = Net(copy.deepcopy(layer))
    model = lorakit.adapt(Net(layer), MosaConfig(r=4, modules=3, seed=5, form="paper", activation="gelu",
                                                 targets=["layer"]))
    perturb(model)
    lorakit.save_adapter(model, tmp_path)
    loaded = lorakit.load_adapter(fresh, tmp_path)
    a, b = model.layer.adapters["default"], loaded.layer.adapters["default"]
    assert type(b) is MosaBottleneck and b.config.form == "paper" and b.config.activation == "gelu"
    assert torch.equal(a.mosa_down, b.mosa_down) and torch.equal(a.mosa_up, b.mosa_up)
    assert torch.equal(a.mosa_module_down, b.mosa_module_down) and torch.equal(a.mosa_module_up, b.mosa_module_up)
    x = torch.randn(4, D_IN)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("form", ["paper", "parallel"])
def test_hierarchical_strategy_draws_nested_granularities(form):
    config = MosaConfig(r=4, modules=8, levels=4, form=form)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(80):
        active = draw_modules(config, 1, gen)
        g = next(g for g in (8, 4, 2, 1) if int(active.sum()) == 8 // g)  # one coarse module of g: 8/g fine ones
        j = int(active.nonzero()[0])
        assert bool((active == (torch.arange(8) % g == j % g)).all())  # the union of fine modules i % g == j
        seen.add(g)
    assert seen == {8, 4, 2, 1}  # every granularity is drawn, from single modules to the complete adapter
    # levels=1 is the plain strategy: exactly k fine modules
    assert all(int(draw_modules(config.replace(levels=1), 3, gen).sum()) == 3 for _ in range(10))
    # the sampled masks of a hierarchical step are unions of fine modules through the hook too
    model, _, m = adapted(config)
    mosa_resample(model, k=1, generator=torch.Generator().manual_seed(1))
    part = m.mosa_module_down if form == "paper" else m.mosa_module_A
    fine = torch.unique(part[m._masks[0]])
    assert bool((m._masks[0] == torch.isin(part, fine)).all())
    with pytest.raises(LorakitError):
        MosaConfig(modules=6, levels=3)  # 6 is not divisible by 2**2
