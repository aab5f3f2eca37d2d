"""Exporting exactly-low-rank adapters of other methods (LoRA-XS/LoRA-SB, SLoRA, ...) as a plain LoRA file."""
from __future__ import annotations

import copy

import pytest
import torch
from zoo import KIND, LAYERS, net, perturb, tiny_llama

import lorakit
from lorakit.methods import METHODS
from lorakit.methods.lora import LoraConfig

peft = pytest.importorskip("peft")  # a dev dependency: always installed by `make test`

FACTORABLE = [m for m in METHODS.names()
              if METHODS.get(m)[0].capabilities.factorable and not issubclass(METHODS.get(m)[1], LoraConfig)]
CASES = [(m, layer) for m in FACTORABLE for layer in LAYERS if KIND[layer] in METHODS.get(m)[0].capabilities.layers]


@pytest.mark.parametrize("method,layer", CASES)
def test_an_exported_factorable_adapter_is_the_same_update_as_a_lora_on_the_stock_layer(method, layer, tmp_path):
    model, x = net(layer)
    stock = copy.deepcopy(model)
    lorakit.adapt(model, lorakit.build_config(method, targets=["layer"]))
    perturb(model)  # trained factors, all non-zero
    lorakit.export_lora(model, tmp_path)
    assert list(lorakit.configs(model)) == ["default"]
    lorakit.load_adapter(stock, tmp_path)
    assert isinstance(lorakit.configs(stock)["default"], LoraConfig)
    torch.testing.assert_close(stock(x), model(x), atol=1e-5, rtol=1e-5)


def test_an_exported_lora_xs_adapter_loads_in_peft_with_equal_outputs(tmp_path):
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    model = lorakit.adapt(tiny_llama(), lorakit.build_config("lora-xs", r=4, targets=["q_proj", "v_proj"]))
    perturb(model, std=0.5)
    lorakit.export_lora(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(theirs(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_methods_that_are_not_low_rank_refuse_export(tmp_path):
    model, _ = net("linear")
    lorakit.adapt(model, lorakit.build_config("kron", targets=["layer"]))
    with pytest.raises(lorakit.LorakitError, match="exactly low rank"):
        lorakit.export_lora(model, tmp_path)


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_export_carries_the_adapters_trained_copies_of_modules_to_save(init, tmp_path):
    """Both export paths (factors; PiSSA's rewritten base: the doubled LoRA) write the adapter's trained head copy,
    not the untrained original."""
    config = LoraConfig(r=4, targets=["q_proj", "v_proj"], init=init, modules_to_save=["lm_head"])
    model = lorakit.adapt(tiny_llama(), config)
    perturb(model)
    with torch.no_grad():
        for key, p in lorakit.trainable_parameters(model).items():
            if "modules_to_save" in key:
                p.add_(0.5)  # the trained copy differs from the original head
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
    lorakit.export_lora(model, tmp_path / "out")
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_factors_on_a_path_that_ends_another_keep_their_own_rank(tmp_path):
    """``up`` and ``block.up`` with different ranks: each layer gets its own (a suffix pattern first would not)."""
    from lorakit.io.export import attach_factors

    model = torch.nn.Module()
    model.up = torch.nn.Linear(5, 6)
    model.block = torch.nn.Module()
    model.block.up = torch.nn.Linear(5, 6)
    factors = {"up": (torch.randn(6, 1), torch.randn(1, 5)), "block.up": (torch.randn(6, 3), torch.randn(3, 5))}
    attach_factors(model, "x", factors, activate=True)
    x = torch.randn(2, 5)
    with torch.no_grad():
        for path, (up, down) in factors.items():
            layer = model.get_submodule(path)
            torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ (up @ down).T, rtol=1e-5, atol=1e-5)
