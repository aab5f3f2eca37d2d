"""PEFT interop of the catalogue methods PEFT also has: Kronecker (LoKr), Bone (MiSS), RandLoRA.

Same weights -> same outputs and gradients (fp32, atol 1e-5) on a tiny Llama; files load both ways.
"""
from __future__ import annotations

import pytest
import torch
from zoo import perturb, tiny_llama

import lorakit
from lorakit.io.adapter_files import adapter_tensors, peft_format

peft = pytest.importorskip("peft")  # a dev dependency: always installed by `make test`

CONFIGS = {
    "kron": (lambda: lorakit.KronConfig(r=4, alpha=8), lambda: peft.LoKrConfig(r=4, alpha=8)),
    "kron-decomposed": (lambda: lorakit.KronConfig(r=1, alpha=2, decompose_both=True),
                        lambda: peft.LoKrConfig(r=1, alpha=2, decompose_both=True)),
    "bone": (lambda: lorakit.BoneConfig(r=5), lambda: peft.MissConfig(r=5)),
    "bone-mini": (lambda: lorakit.BoneConfig(r=4, variant="mini", mini_r=4),
                  lambda: peft.MissConfig(r=4, init_weights="mini", mini_r=4)),
    "randlora": (lambda: lorakit.RandLoraConfig(r=4, alpha=16), lambda: peft.RandLoraConfig(r=4, randlora_alpha=16)),
    "randlora-r7": (lambda: lorakit.RandLoraConfig(r=7, alpha=16, projection_prng_key=3),
                    lambda: peft.RandLoraConfig(r=7, randlora_alpha=16, projection_prng_key=3)),
}
IDS = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(1))


def peft_model(name: str):
    config = CONFIGS[name][1]()
    config.target_modules = "all-linear"
    return peft.get_peft_model(tiny_llama(), config)


def pair(name: str):
    """lorakit and PEFT models holding the same (perturbed) adapter weights."""
    config = CONFIGS[name][0]()
    ours = lorakit.adapt(tiny_llama(), config)
    perturb(ours, std=0.2)
    theirs = peft_model(name)
    state = peft_format(config).to_file(adapter_tensors(ours, "default"), config)
    result = peft.set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys
    return ours, theirs


def _file_key(param_name: str) -> str:
    return param_name.removeprefix("base_model.model.").replace(".default", "")


@pytest.mark.parametrize("name", CONFIGS)
def test_same_weights_same_outputs_and_gradients(name):
    ours, theirs = pair(name)
    ours.train(), theirs.train()
    out_ours, out_theirs = ours(IDS).logits, theirs(IDS).logits
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-5)
    out_ours.pow(2).mean().backward()
    out_theirs.pow(2).mean().backward()
    ours_grads = {k.replace(".adapters.default", ""): p.grad for k, p in lorakit.trainable_parameters(ours).items()}
    theirs_grads = {_file_key(k): p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == theirs_grads.keys()
    for key in ours_grads:
        torch.testing.assert_close(ours_grads[key], theirs_grads[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", CONFIGS)
def test_files_load_both_ways(name, tmp_path):
    ours, theirs = pair(name)
    expected = ours(IDS).logits

    lorakit.save_adapter(ours, tmp_path / "ours")
    peft_loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_loaded(IDS).logits, expected, atol=1e-5, rtol=1e-5)

    theirs.save_pretrained(tmp_path / "theirs")
    ours_loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "theirs")
    assert type(lorakit.configs(ours_loaded)["default"]) is type(CONFIGS[name][0]())
    torch.testing.assert_close(ours_loaded(IDS).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["randlora", "randlora-r7"])
def test_randlora_bases_are_peft_bases_regenerated_from_the_seed(name, tmp_path):
    ours = lorakit.adapt(tiny_llama(), CONFIGS[name][0]())
    bases = lorakit.inject.shared_states(ours)["default"]
    theirs = peft_model(name)
    q = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(bases.randlora_A, q.randlora_A["default"])
    assert torch.equal(bases.randlora_B, q.randlora_B["default"])
    # a PEFT file without the bases (save_projection=False) loads by regenerating them
    config = CONFIGS[name][1]()
    config.target_modules, config.save_projection = "all-linear", False
    theirs = peft.get_peft_model(tiny_llama(), config)
    perturb_peft(theirs)
    theirs.save_pretrained(tmp_path)
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(IDS).logits, theirs(IDS).logits, atol=1e-5, rtol=1e-5)


def perturb_peft(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
