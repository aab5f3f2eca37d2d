"""Bone's Bat variant (block affine transformation, ``dW_ij = W_ij M_i + M_i``; METHODS.md entry 10).

Checked against a block-by-block reference, against PEFT's MiSS ``init_weights="bat"`` (outputs and files both ways),
for merge / unmerge, and for identity at init.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import Net, perturb, tiny_llama

import lorakit
from lorakit.hosts.host import HostLayer
from lorakit.inject import hosts
from lorakit.io.adapter_files import adapter_tensors, peft_format

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(1))
R = 4


def _bat_layer(d_in: int = 12, d_out: int = 8) -> tuple[Net, HostLayer, torch.Tensor]:
    torch.manual_seed(0)
    model = lorakit.adapt(Net(nn.Linear(d_in, d_out)), lorakit.BoneConfig(r=R, variant="bat", targets=["layer"]))
    host = next(hosts(model))
    with torch.no_grad():
        host.adapters["default"].miss_block.normal_(std=0.3)
    return model, host, torch.randn(5, d_in)


def _reference_delta(w0: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``dW`` with explicit loops over the ``r x r`` blocks ``W_ij`` of ``w0``: ``W_ij @ M_i + M_i``."""
    delta = torch.zeros_like(w0)
    for i in range(w0.shape[0] // R):
        for j in range(w0.shape[1] // R):
            block = w0[i * R:(i + 1) * R, j * R:(j + 1) * R]
            delta[i * R:(i + 1) * R, j * R:(j + 1) * R] = block @ m[i] + m[i]
    return delta


def test_update_is_the_block_affine_formula():
    model, host, x = _bat_layer()
    adapter, layer = host.adapters["default"], host.base_layer
    assert adapter.miss_block.shape == (8 // R, R, R)  # one r x r matrix per output block-row, as in PEFT
    expected = _reference_delta(layer.weight.detach(), adapter.miss_block.detach())
    assert expected.abs().max() > 0.1  # a non-trivial update
    torch.testing.assert_close(adapter.delta_weight(host.backend), expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (layer.weight + expected).t() + layer.bias, atol=1e-5, rtol=1e-5)
    assert adapter.factors() is None and not adapter.capabilities.factorable  # W0-dependent, not low rank


def test_bat_requires_r_to_divide_both_sides_and_no_dropout():
    with pytest.raises(lorakit.LorakitError, match="must divide"):
        lorakit.adapt(Net(nn.Linear(10, 8)), lorakit.BoneConfig(r=R, variant="bat", targets=["layer"]))
    with pytest.raises(lorakit.LorakitError, match="dropout"):
        lorakit.BoneConfig(r=R, variant="bat", dropout=0.1)


def test_identity_at_init():
    base = tiny_llama()
    ours = lorakit.adapt(tiny_llama(), lorakit.BoneConfig(r=R, variant="bat"))
    assert all(not h.adapters["default"].miss_block.any() for h in hosts(ours))
    torch.testing.assert_close(ours(IDS).logits, base(IDS).logits, atol=0, rtol=0)


def test_merge_equals_forward_and_unmerge_restores_the_base():
    model, host, x = _bat_layer()
    w0 = host.base_layer.weight.detach().clone()
    with torch.no_grad():
        expected = model(x)
        lorakit.merge(model)
        merged = w0 + _reference_delta(w0, host.adapters["default"].miss_block)
        torch.testing.assert_close(host.base_layer.weight, merged)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        lorakit.unmerge(model)
        torch.testing.assert_close(host.base_layer.weight, w0, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        # again, on a whole model with every linear layer merged
        ours = lorakit.adapt(tiny_llama(), lorakit.BoneConfig(r=R, variant="bat"))
        perturb(ours, std=0.2)
        weights = {h.path: h.base_layer.weight.clone() for h in hosts(ours)}
        logits = ours(IDS).logits
        lorakit.merge(ours)
        assert any(not torch.equal(h.base_layer.weight, weights[h.path]) for h in hosts(ours))
        torch.testing.assert_close(ours(IDS).logits, logits, atol=1e-5, rtol=1e-5)
        lorakit.unmerge(ours)
        for h in hosts(ours):
            torch.testing.assert_close(h.base_layer.weight, weights[h.path], atol=1e-6, rtol=0)
            assert h.adapters["default"]._merged_bat is None  # the cached dW is dropped on unmerge
        torch.testing.assert_close(ours(IDS).logits, logits, atol=1e-5, rtol=1e-5)


def _pair():
    """lorakit and PEFT (MiSS ``init_weights="bat"``) models with the same random block matrices."""
    config = lorakit.BoneConfig(r=R, variant="bat")
    ours = lorakit.adapt(tiny_llama(), config)
    perturb(ours, std=0.2)
    theirs = peft.get_peft_model(tiny_llama(), peft.MissConfig(r=R, init_weights="bat", target_modules="all-linear"))
    state = peft_format(config).to_file(adapter_tensors(ours, "default"), config)
    result = peft.set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "miss_block" in k]
    return ours, theirs


def test_same_weights_same_outputs_as_peft_bat():
    ours, theirs = _pair()
    with torch.no_grad():
        expected = ours(IDS).logits
        torch.testing.assert_close(theirs(IDS).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected, tiny_llama()(IDS).logits, atol=1e-3)  # the adapter does something


def test_bat_files_load_both_ways(tmp_path):
    ours, theirs = _pair()
    with torch.no_grad():
        expected = ours(IDS).logits
        lorakit.save_adapter(ours, tmp_path / "ours")
        peft_loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
        assert peft_loaded.peft_config["default"].init_weights == "bat"
        torch.testing.assert_close(peft_loaded(IDS).logits, expected, atol=1e-5, rtol=1e-5)

        theirs.save_pretrained(tmp_path / "theirs")
        ours_loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "theirs")
        assert lorakit.configs(ours_loaded)["default"].variant == "bat"
        torch.testing.assert_close(ours_loaded(IDS).logits, expected, atol=1e-5, rtol=1e-5)
