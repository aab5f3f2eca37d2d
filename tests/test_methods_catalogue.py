"""Catalogue methods (METHODS.md section A): each one's defining property and its trainable-parameter formula,
checked against dense reference computations written out independently of the implementation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from zoo import Net, perturb, tiny_llama

import lorakit
from lorakit.io.adapter_files import WEIGHTS_FILE


def adapted(layer: torch.nn.Module, config):
    torch.manual_seed(0)
    model = lorakit.adapt(Net(layer), config.replace(targets=["layer"]))
    perturb(model)
    host = model.layer
    return model, host, host.adapters["default"]


def n_trainable(model) -> int:
    return sum(p.numel() for p in lorakit.trainable_parameters(model).values())


# -- Kronecker (DiffuseKronA / LoKr) --------------------------------------------------------------------------------
@pytest.mark.parametrize("r,decompose_both", [(8, False), (1, True)])
def test_kron_update_is_the_scaled_kronecker_product_and_never_formed(r, decompose_both):
    # Linear(48 -> 40): d_out = 5 * 8, d_in = 6 * 8 (near-square divisors)
    config = lorakit.KronConfig(r=r, alpha=4, decompose_both=decompose_both)
    model, host, kron = adapted(torch.nn.Linear(48, 40), config)
    p = dict(kron.named_parameters())
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
    assert w1.shape == (5, 6) and w2.shape == (8, 8)
    dense = torch.kron(w1, w2) * (4 / r)
    torch.testing.assert_close(kron.delta_weight(host.backend), dense)
    x = torch.randn(3, 7, 48)
    torch.testing.assert_close(model(x), host.base_layer(x) + F.linear(x, dense), atol=1e-5, rtol=1e-5)


def test_kron_on_conv2d_puts_the_kernel_in_the_second_factor():
    conv = torch.nn.Conv2d(6, 8, 3, padding=1, stride=2)
    model, host, kron = adapted(conv, lorakit.KronConfig(r=8))
    w1, w2 = kron.lokr_w1, kron.lokr_w2  # (2, 2), (4, 3, 3, 3)
    kernel = torch.kron(w1[:, :, None, None], w2) * kron.scale  # (8, 6, 3, 3)
    x = torch.randn(2, 6, 9, 9)
    expected = host.base_layer(x) + F.conv2d(x, kernel, stride=2, padding=1)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_kron_rank_is_the_product_of_the_factor_ranks():
    _, host, kron = adapted(torch.nn.Linear(64, 64), lorakit.KronConfig(r=8))  # factors (8, 8) and (8, 8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        kron.lokr_w1.copy_(torch.randn(8, 2, generator=g) @ torch.randn(2, 8, generator=g))  # rank 2
        kron.lokr_w2.copy_(torch.randn(8, 3, generator=g) @ torch.randn(3, 8, generator=g))  # rank 3
        assert torch.linalg.matrix_rank(kron.delta_weight(host.backend)) == 6
        kron.lokr_w1.copy_(torch.randn(8, 8, generator=g))
        kron.lokr_w2.copy_(torch.randn(8, 8, generator=g))
        assert torch.linalg.matrix_rank(kron.delta_weight(host.backend)) == 64  # full rank from 128 numbers


@pytest.mark.parametrize("r,expected", [(8, 5 * 6 + 8 * 8), (2, 5 * 6 + 2 * (8 + 8))])
def test_kron_trainable_count_is_a1_a2_plus_b1_b2_or_its_rank_r_factorisation(r, expected):
    model, _, _ = adapted(torch.nn.Linear(48, 40), lorakit.KronConfig(r=r))
    assert n_trainable(model) == expected


# -- Bone / MiSS ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [4, 5])  # 5 does not divide d_in = 12: the last block is cut
def test_bone_update_repeats_one_block_over_the_input_blocks(r):
    model, host, bone = adapted(torch.nn.Linear(12, 10), lorakit.BoneConfig(r=r))
    m = bone.miss_block.detach()  # (r, d_out)
    dense = torch.zeros(10, 12)
    for start in range(0, 12, r):
        width = min(r, 12 - start)
        dense[:, start : start + width] = m.t()[:, :width]
    torch.testing.assert_close(bone.delta_weight(host.backend), dense)
    b, a = bone.factors()
    torch.testing.assert_close(b @ a, dense)
    x = torch.randn(3, 12)
    torch.testing.assert_close(model(x), host.base_layer(x) + x @ dense.t(), atol=1e-5, rtol=1e-5)


def test_bone_trainable_count_is_d_out_times_r_and_mini_shares_it():
    model, _, _ = adapted(torch.nn.Linear(12, 10), lorakit.BoneConfig(r=4))
    assert n_trainable(model) == 10 * 4
    model, host, bone = adapted(torch.nn.Linear(12, 10), lorakit.BoneConfig(r=4, variant="mini", mini_r=2))
    assert n_trainable(model) == 4 * 2
    delta = bone.delta_weight(host.backend)
    torch.testing.assert_close(delta[:2], delta[8:])  # every group of mini_r outputs gets the same rows


def test_bone_rejects_blocks_that_do_not_fit():
    with pytest.raises(lorakit.ConfigError, match="r=16 is invalid: must be <= the layer's d_in"):
        lorakit.adapt(Net(torch.nn.Linear(12, 10)), lorakit.BoneConfig(r=16, targets=["layer"]))
    with pytest.raises(lorakit.ConfigError, match="mini_r=3 is invalid: must divide"):
        lorakit.adapt(Net(torch.nn.Linear(12, 10)), lorakit.BoneConfig(r=4, variant="mini", mini_r=3,
                                                                      targets=["layer"]))


# -- RandLoRA -------------------------------------------------------------------------------------------------------
def randlora_reference(adapter) -> torch.Tensor:
    """``s * sum over (k, n) of lambda[k, n] * b_(k, n) (a_k * gamma_n)^T`` with PEFT's basis pairing, in loops."""
    a = adapter.shared.randlora_A[:, 0, : adapter.small].double()  # (r, small)
    b = adapter.shared.randlora_B[: adapter.big].double()  # (big, N_shared, r)
    lam, gam = adapter.randlora_lambda.detach().double(), adapter.randlora_gamma.detach().double()
    r, n_bases = lam.shape
    delta = torch.zeros(adapter.big, adapter.small, dtype=torch.float64)
    for k in range(r):
        for n in range(n_bases):
            m = k * n_bases + n  # row of the flattened (r, N) scaled basis ...
            column = b[:, m // r, m % r]  # ... meets column m of the flattened (N, r) basis
            delta += lam[k, n] * torch.outer(column, a[k] * gam[n])
    delta = delta * adapter.scale
    return delta if adapter.geometry.d_in == adapter.small else delta.t()


@pytest.mark.parametrize("d_in,d_out", [(24, 40), (40, 24)])
def test_randlora_update_is_full_rank_with_few_trainable_numbers(d_in, d_out):
    model, host, adapter = adapted(torch.nn.Linear(d_in, d_out), lorakit.RandLoraConfig(r=4, alpha=8))
    delta = adapter.delta_weight(host.backend)
    torch.testing.assert_close(delta.double(), randlora_reference(adapter), atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(delta) == 24  # min(d_in, d_out): full rank ...
    n_bases = -(-24 // 4)
    assert n_trainable(model) == n_bases * 4 + n_bases * 24 < 4 * (d_in + d_out)  # ... from fewer numbers than LoRA r=4
    x = torch.randn(3, d_in)
    torch.testing.assert_close(model(x), host.base_layer(x) + x @ delta.t(), atol=1e-5, rtol=1e-5)


def test_randlora_bases_are_shared_once_per_adapter_and_frozen():
    model = lorakit.adapt(tiny_llama(), lorakit.RandLoraConfig(r=4))
    lorakit.adapt(model, lorakit.RandLoraConfig(r=4, projection_prng_key=1), "other")
    shared = lorakit.inject.shared_states(model)
    adapters = [h.adapters["default"] for h in lorakit.inject.hosts(model)]
    assert all(a.shared is shared["default"] for a in adapters) and shared["default"] is not shared["other"]
    assert not any("randlora_A" in k for a in adapters for k in a.state_dict())
    buffers = [n for n, _ in model.named_buffers() if "randlora" in n]
    assert sorted(buffers) == [f"lorakit_shared.{a}.randlora_{m}" for a in ("default", "other") for m in "AB"]
    assert not any("randlora_A" in k or "randlora_B" in k for k in lorakit.trainable_parameters(model))
    model.double()  # moving the model moves the bases every layer reads
    assert all(a.shared.randlora_B.dtype == torch.float64 for a in adapters)
    lorakit.delete_adapter(model, "other")
    assert list(lorakit.inject.shared_states(model)) == ["default"]
    lorakit.unload(model)
    assert not hasattr(model, "lorakit_shared")


@pytest.mark.parametrize("save_projection", [True, False])
def test_randlora_files_hold_the_bases_once_or_not_at_all(save_projection, tmp_path):
    model = lorakit.adapt(tiny_llama(), lorakit.RandLoraConfig(r=4, save_projection=save_projection,
                                                               projection_prng_key=5))
    perturb(model)
    lorakit.save_adapter(model, tmp_path)
    bases = [k for k in load_file(tmp_path / WEIGHTS_FILE) if k.endswith(("randlora_A", "randlora_B"))]
    assert bases == (["base_model.randlora_A", "base_model.randlora_B"] if save_projection else [])
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    ids = torch.randint(0, 96, (2, 8))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
