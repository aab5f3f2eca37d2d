"""PEFT parity of PiSSA / OLoRA, and export of base-rewriting adapters as a LoRA on the stock model."""
from __future__ import annotations

import pytest
import torch
from zoo import tiny_gpt2, tiny_llama

import lorakit
from lorakit.inject import hosts

peft = pytest.importorskip("peft")  # a dev dependency: always installed by `make test`

IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def peft_layers(model) -> dict[str, torch.nn.Module]:
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if hasattr(m, "lora_A")}


# PEFT 0.21's olora_init factorises GPT-2 Conv1D weights in their stored (d_in, d_out) layout (it ignores
# fan_in_fan_out), so OLoRA parity is checked on Llama only.
@pytest.mark.parametrize("model_name,init", [("llama", "pissa"), ("gpt2", "pissa"), ("llama", "olora")])
def test_same_base_gives_the_same_residual_and_factors_as_peft(model_name, init):
    ours = lorakit.adapt(MODELS[model_name](), lorakit.LoraConfig(r=4, alpha=8, init=init))
    theirs = peft.get_peft_model(MODELS[model_name](), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=init, target_modules="all-linear"))
    layers = peft_layers(theirs)
    assert {h.path for h in hosts(ours)} == set(layers)
    for host in hosts(ours):
        ad, their = host.adapters["default"], layers[host.path]
        b, a = their.lora_B["default"].weight, their.lora_A["default"].weight
        sign = torch.sign((ad.b * b).sum(0))  # PiSSA: singular pairs up to a common sign
        torch.testing.assert_close(ad.b * sign, b, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ad.a * sign[:, None], a, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(host.base_layer.weight, their.base_layer.weight, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, atol=1e-5, rtol=1e-5)


def trained(model) -> None:
    with torch.no_grad():
        for p in lorakit.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("config", [
    lorakit.LoraConfig(r=4, alpha=8, init="pissa", init_options={"niter": 2}),
    lorakit.LoraConfig(r=4, alpha=4, init="olora", use_rslora=True),
    lorakit.DoraConfig(r=4, alpha=8, init="pissa"),
], ids=["pissa-fast", "olora-rslora", "dora-pissa"])
def test_exported_lora_on_the_stock_model_equals_the_residual_model(model_name, config, tmp_path):
    model = lorakit.adapt(MODELS[model_name](), config)
    trained(model)
    expected = model(IDS).logits
    lorakit.export_lora(model, tmp_path)
    assert list(lorakit.configs(model)) == ["default"]  # the temporary export adapter is gone
    ours = lorakit.load_adapter(MODELS[model_name](), tmp_path)
    torch.testing.assert_close(ours(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    assert lorakit.configs(ours)["default"].r == 8
    theirs = peft.PeftModel.from_pretrained(MODELS[model_name](), tmp_path).eval()
    torch.testing.assert_close(theirs(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_exported_lora_ga_adapter_loads_in_peft_on_the_stock_model(tmp_path):
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(r=2, alpha=4, init="lora-ga"))
    lorakit.initialize(model, [{"input_ids": IDS, "labels": IDS}])
    trained(model)
    expected = model(IDS).logits
    lorakit.export_lora(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(theirs(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_loftq_adapters_refuse_export_to_the_stock_model(tmp_path):
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(r=2, init="loftq", targets=["q_proj"]))
    with pytest.raises(lorakit.ConfigError, match="quantised weight"):
        lorakit.export_lora(model, tmp_path)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_residual_adapters_load_both_ways_because_peft_redoes_the_init(init, tmp_path):
    ours = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(r=4, alpha=8, init=init))
    trained(ours)
    expected = ours(IDS).logits
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path / "theirs")  # PEFT's file: read through its config
    assert lorakit.configs(reloaded)["default"].init == init
    torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_peft_inits_that_cannot_be_redone_are_refused(tmp_path):
    import json

    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(r=4, targets=["q_proj"]))
    model_dir = tmp_path / "a"
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(model_dir)
    cfg = json.loads((model_dir / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "loftq"
    (model_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(lorakit.AdapterFileError, match="init_lora_weights='loftq'"):
        lorakit.load_adapter(model, model_dir, name="x")
