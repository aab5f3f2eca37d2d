"""Parity with Hugging Face PEFT: same weights -> same outputs and gradients; files load both ways."""
from __future__ import annotations

import pytest
import torch
from zoo import perturb, tiny_gpt2, tiny_llama

import lorakit
from lorakit.io.adapter_files import adapter_tensors

peft = pytest.importorskip("peft")  # a dev dependency: always installed by `make test`

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
CONFIGS = {
    "lora": (lambda: lorakit.LoraConfig(r=4, alpha=8), dict(r=4, lora_alpha=8)),
    "rslora": (lambda: lorakit.LoraConfig(r=4, alpha=8, use_rslora=True), dict(r=4, lora_alpha=8, use_rslora=True)),
    "dora": (lambda: lorakit.DoraConfig(r=4, alpha=8), dict(r=4, lora_alpha=8, use_dora=True)),
}
IDS = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(1))


def pair(model_name: str, config_name: str):
    ours_cfg, peft_kwargs = CONFIGS[config_name]
    ours = lorakit.adapt(MODELS[model_name](), ours_cfg())
    perturb(ours, std=0.2)
    theirs = peft.get_peft_model(
        MODELS[model_name](), peft.LoraConfig(target_modules="all-linear", **peft_kwargs)
    )
    state = {k.removeprefix("base_model.model."): v for k, v in adapter_tensors(ours, "default").items()}
    result = peft.set_peft_model_state_dict(theirs, {f"base_model.model.{k}": v for k, v in state.items()})
    assert not result.unexpected_keys
    return ours, theirs


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_same_weights_same_outputs_and_gradients(model_name, config_name):
    ours, theirs = pair(model_name, config_name)
    ours.train(), theirs.train()
    out_ours, out_theirs = ours(IDS).logits, theirs(IDS).logits
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-5)
    out_ours.pow(2).mean().backward()
    out_theirs.pow(2).mean().backward()
    ours_grads = {k.removeprefix("base_model.model."): v.grad for k, v in _by_peft_key(ours).items()}
    theirs_grads = {
        _peft_to_file_key(k): p.grad
        for k, p in theirs.named_parameters() if p.requires_grad
    }
    assert ours_grads.keys() == theirs_grads.keys()
    for key in ours_grads:
        torch.testing.assert_close(ours_grads[key].reshape(theirs_grads[key].shape), theirs_grads[key],
                                   atol=1e-5, rtol=1e-4)


def _peft_to_file_key(param_name: str) -> str:
    """PEFT's parameter name -> its saved key (adapter name dropped, DoRA's ``.weight`` dropped)."""
    key = param_name.removeprefix("base_model.model.").replace(".default", "")
    return key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def _by_peft_key(model) -> dict[str, torch.nn.Parameter]:
    out = {}
    for host in lorakit.inject.hosts(model):
        for key, p in host.adapters["default"].named_parameters():
            out[f"{host.path}.{key}"] = p
    return out


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_files_load_both_ways(model_name, config_name, tmp_path):
    ours, theirs = pair(model_name, config_name)
    expected = ours(IDS).logits

    lorakit.save_adapter(ours, tmp_path / "ours")
    peft_loaded = peft.PeftModel.from_pretrained(MODELS[model_name](), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_loaded(IDS).logits, expected, atol=1e-5, rtol=1e-5)

    theirs.save_pretrained(tmp_path / "theirs")
    ours_loaded = lorakit.load_adapter(MODELS[model_name](), tmp_path / "theirs")
    torch.testing.assert_close(ours_loaded(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_rank_pattern_round_trips_through_peft(tmp_path):
    cfg = lorakit.LoraConfig(r=4, alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3.0})
    ours = lorakit.adapt(tiny_llama(), cfg)
    perturb(ours)
    q = ours.model.layers[0].self_attn.q_proj.adapters["default"]
    assert q.a.shape[0] == 2
    assert ours.model.layers[0].self_attn.v_proj.adapters["default"].scale == pytest.approx(3.0 / 4)
    lorakit.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(loaded(IDS).logits, ours(IDS).logits, atol=1e-5, rtol=1e-5)


def test_subset_targets_written_so_peft_adapts_the_same_modules(tmp_path):
    cfg = lorakit.LoraConfig(r=4, targets=r"model\.layers\.0\.self_attn\.(q|v)_proj")
    ours = lorakit.adapt(tiny_llama(), cfg)
    perturb(ours)
    lorakit.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    adapted = [n for n, m in loaded.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert sorted(adapted) == sorted(f"base_model.model.model.layers.0.self_attn.{p}_proj" for p in "qv")
    torch.testing.assert_close(loaded(IDS).logits, ours(IDS).logits, atol=1e-5, rtol=1e-5)
