"""Public API behaviour on real transformers models: activation, routing, merge, unload, delete."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import perturb, tiny_llama

import lorakit

IDS = torch.randint(0, 96, (4, 10), generator=torch.Generator().manual_seed(2))


def two_adapters():
    model = tiny_llama()
    lorakit.adapt(model, lorakit.LoraConfig(r=4, init="random"), "a")
    lorakit.adapt(model, lorakit.DoraConfig(r=2, targets=["q_proj", "v_proj"], init="random"), "b")
    return model


def test_new_adapter_becomes_active_and_all_adapters_are_trainable():
    model = two_adapters()
    assert lorakit.active_adapters(model) == ["b"]
    names = lorakit.trainable_parameters(model)
    assert any(".a." in k for k in names) and any(".b." in k for k in names)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "lm_head.weight" in frozen and "model.norm.weight" in frozen
    assert set(lorakit.trainable_parameters(model, "b")) == {k for k in names if ".adapters.b." in k}


def test_several_active_adapters_sum_their_contributions():
    model = two_adapters()
    with lorakit.disable(model):
        base = model.model.layers[0].self_attn.q_proj(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    layer = model.model.layers[0].self_attn.q_proj
    lorakit.set_active(model, "a")
    only_a = layer(x) - base
    lorakit.set_active(model, "b")
    only_b = layer(x) - base
    lorakit.set_active(model, ["a", "b"])
    torch.testing.assert_close(layer(x), base + only_a + only_b, atol=1e-6, rtol=1e-6)


def test_disable_and_enable_work_as_calls_and_context_managers():
    model = two_adapters()
    adapted = model(IDS).logits
    with lorakit.disable(model):
        base = model(IDS).logits
    assert not torch.allclose(base, adapted)
    torch.testing.assert_close(model(IDS).logits, adapted)
    lorakit.disable(model)
    torch.testing.assert_close(model(IDS).logits, base)
    with lorakit.enable(model):
        torch.testing.assert_close(model(IDS).logits, adapted)
    torch.testing.assert_close(model(IDS).logits, base)
    lorakit.enable(model)
    torch.testing.assert_close(model(IDS).logits, adapted)


def test_route_errors_are_clear():
    model = two_adapters()
    with pytest.raises(lorakit.LorakitError, match="unknown adapter 'c'"):
        with lorakit.route(model, ["a", "c", None, None]):
            pass
    with pytest.raises(lorakit.LorakitError, match="3 adapter names but layer .* batch of 4 rows"):
        with lorakit.route(model, ["a", "b", None]):
            model(IDS)
    with pytest.raises(lorakit.LorakitError, match="unknown adapter 'zz'"):
        lorakit.set_active(model, "zz")


def test_route_is_restored_after_the_block_even_on_error():
    model = two_adapters()
    with pytest.raises(RuntimeError):
        with lorakit.route(model, ["a", "b", None, "a"]):
            raise RuntimeError("boom")
    assert all(h.routing is None for h in lorakit.inject.hosts(model))


def test_generate_with_a_different_adapter_per_row_matches_each_row_alone():
    model = two_adapters()
    prompts = IDS[:, :4]
    names = ["a", "b", None, "b"]
    with lorakit.route(model, names):
        mixed = model.generate(prompts, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for i, name in enumerate(names):
        if name is None:
            with lorakit.disable(model):
                alone = model.generate(prompts[i : i + 1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        else:
            lorakit.set_active(model, name)
            alone = model.generate(prompts[i : i + 1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(mixed[i : i + 1], alone)


def test_merge_only_what_is_named_and_refuse_routing_while_merged():
    model = two_adapters()
    lorakit.set_active(model, ["a", "b"])
    expected = model(IDS).logits
    lorakit.merge(model)
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(lorakit.LorakitError, match="unmerge before routing"):
        with lorakit.route(model, ["a", "a", "a", "a"]):
            model(IDS)
    with pytest.raises(lorakit.LorakitError, match="unmerge before disabling"):
        with lorakit.disable(model):
            model(IDS)
    lorakit.unmerge(model)
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_delete_adapter_restores_original_modules_when_none_remain():
    model = two_adapters()
    original_q = model.model.layers[0].self_attn.q_proj.base_layer
    lorakit.delete_adapter(model, "a")
    assert lorakit.configs(model).keys() == {"b"}
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)  # only "a" had it
    assert lorakit.active_adapters(model) == ["b"]
    lorakit.delete_adapter(model, "b")
    assert model.model.layers[0].self_attn.q_proj is original_q
    torch.testing.assert_close(model(IDS).logits, tiny_llama()(IDS).logits)


def test_unload_without_merge_gives_back_the_base_model():
    model = two_adapters()
    perturb(model)
    lorakit.merge(model)
    lorakit.unload(model)
    assert not list(lorakit.inject.hosts(model)) and not lorakit.configs(model)
    torch.testing.assert_close(model(IDS).logits, tiny_llama()(IDS).logits, atol=1e-5, rtol=1e-5)


def test_adapter_dtype_option_keeps_float32_adapters_on_a_bf16_model():
    model = tiny_llama().to(torch.bfloat16)
    lorakit.adapt(model, lorakit.LoraConfig(r=4, init="random"), dtype=torch.float32)
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.a.dtype == torch.float32
    out = model(IDS).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert adapter.a.grad is not None and adapter.a.grad.dtype == torch.float32


def test_adapt_with_bad_arguments():
    with pytest.raises(lorakit.ConfigError, match="name"):
        lorakit.adapt(tiny_llama(), lorakit.LoraConfig(), "has.dot")
    with pytest.raises(lorakit.ConfigError, match="config"):
        lorakit.adapt(tiny_llama(), {"r": 4})  # type: ignore[arg-type]
