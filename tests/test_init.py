"""Weight-based initialisers: each paper's defining property (PiSSA, OLoRA, NLoRA, LoftQ) and config rules."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import net, tiny_llama

import lorakit
from lorakit.init.loftq import loftq
from lorakit.init.pissa import pissa
from lorakit.init.quantize import fake_quantize
from lorakit.methods.lora import Lora

IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))


def linear(d_out: int = 10, d_in: int = 12, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


def adapter_of(model: nn.Module, name: str = "default") -> Lora:
    return next(h.adapters[name] for h in lorakit.inject.hosts(model) if name in h.adapters)


def effective(model: nn.Module) -> torch.Tensor:
    """Base weight plus the active adapter's update of the single adapted layer."""
    host = next(lorakit.inject.hosts(model))
    return host.backend.weight().float() + adapter_of(model).delta_weight(host.backend)


# --- PiSSA -----------------------------------------------------------------------------------------------------
def test_pissa_factors_are_the_principal_singular_pairs_and_the_base_is_the_residual():
    model = linear()
    w = model[0].weight.detach().clone()
    lorakit.adapt(model, lorakit.LoraConfig(r=3, alpha=6, init="pissa", targets=["0"]))
    ad, w_res = adapter_of(model), model[0].base_layer.weight.detach()
    u, s, vh = torch.linalg.svd(w)
    sign = torch.sign((ad.b * u[:, :3]).sum(0))  # singular vectors are defined up to sign
    torch.testing.assert_close(ad.b * sign, u[:, :3] * (s[:3] / ad.scale).sqrt())
    torch.testing.assert_close(ad.a * sign[:, None], (s[:3] / ad.scale).sqrt()[:, None] * vh[:3])
    torch.testing.assert_close(w_res + ad.scale * ad.b @ ad.a, w, atol=1e-6, rtol=0)
    assert torch.linalg.matrix_norm(w_res, ord=2) == pytest.approx(s[3].item(), rel=1e-5)  # ||W_res||_2 = s_{r+1}
    assert {k for k, p in model.named_parameters() if p.requires_grad} == {k for k in dict(model.named_parameters())
                                                                           if "lora_" in k}


def test_pissa_keeps_the_model_output_and_lora_parameter_count():
    base = tiny_llama()
    expected = base(IDS).logits
    lora_count = sum(p.numel() for p in lorakit.trainable_parameters(
        lorakit.adapt(tiny_llama(), lorakit.LoraConfig(r=4))).values())
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(r=4, alpha=16, init="pissa"))
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in lorakit.trainable_parameters(model).values()) == lora_count


def test_randomized_svd_with_niter_is_close_to_exact_and_improves_with_niter():
    torch.manual_seed(0)
    w = torch.randn(64, 48) @ torch.diag(0.8 ** torch.arange(48.0)) @ torch.linalg.qr(torch.randn(48, 48)).Q
    exact = pissa(w, 6, 1.0)
    errors = []
    for niter in (0, 1, 4):
        fast = pissa(w, 6, 1.0, niter=niter)
        errors.append(torch.linalg.norm(fast.b @ fast.a - exact.b @ exact.a) / torch.linalg.norm(exact.b @ exact.a))
    assert errors[2] < 1e-4 and errors[2] < errors[1] < errors[0]
    again = pissa(w, 6, 1.0, niter=4)
    assert torch.equal(again.b, pissa(w, 6, 1.0, niter=4).b)  # seeded: the same weight gives the same factors


def test_pissa_on_conv_and_embedding_layers_is_identity_at_init():
    for layer in ("conv2d", "embedding", "gpt2_conv1d"):
        model, x = net(layer)
        expected = model(x)
        lorakit.adapt(model, lorakit.LoraConfig(r=3, alpha=3, init="pissa", targets=["layer"]))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_pissa_dora_starts_at_the_base_model_with_the_original_norms():
    model = linear()
    x = torch.randn(4, 12)
    expected, norms = model(x), model[0].weight.detach().norm(dim=1)
    lorakit.adapt(model, lorakit.DoraConfig(r=3, alpha=6, init="pissa", targets=["0"]))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter_of(model).lora_magnitude_vector.detach(), norms, atol=1e-5, rtol=1e-5)


def test_building_without_attaching_leaves_the_base_alone():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.inspect_targets(model, lorakit.LoraConfig(r=4, init="pissa"))
    with pytest.raises(lorakit.ConfigError, match="needs 20 singular directions"):  # q_proj fits, k_proj (16, 32) not
        lorakit.adapt(model, lorakit.LoraConfig(r=20, init="pissa", targets=["q_proj", "k_proj"]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_saved_pissa_adapter_reloads_on_the_stock_model(tmp_path):
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(r=4, alpha=4, init="pissa"))
    with torch.no_grad():
        for p in lorakit.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    expected = model(IDS).logits
    lorakit.save_adapter(model, tmp_path)
    fresh = lorakit.load_adapter(tiny_llama(), tmp_path)  # re-runs the exact SVD: same residual
    torch.testing.assert_close(fresh(IDS).logits, expected, atol=1e-5, rtol=1e-5)


# --- OLoRA -----------------------------------------------------------------------------------------------------
def test_olora_factors_come_from_the_qr_of_the_weight_and_the_base_is_compensated():
    model = linear()
    w = model[0].weight.detach().clone()
    lorakit.adapt(model, lorakit.LoraConfig(r=4, alpha=8, init="olora", targets=["0"]))
    ad = adapter_of(model)
    q, r = torch.linalg.qr(w)
    torch.testing.assert_close(ad.b, q[:, :4])
    torch.testing.assert_close(ad.a, r[:4])
    torch.testing.assert_close(ad.b.t() @ ad.b, torch.eye(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(model[0].base_layer.weight + ad.scale * ad.b @ ad.a, w, atol=1e-6, rtol=0)


# --- NLoRA -----------------------------------------------------------------------------------------------------
def test_nystrom_sketch_is_exact_for_a_rank_r_weight_and_nlora_starts_at_the_base_model():
    model = linear()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(10, 3) @ torch.randn(3, 12))  # rank 3, W_IJ invertible a.s.
    w = model[0].weight.detach().clone()
    x = torch.randn(4, 12)
    expected = model(x)
    lorakit.adapt(model, lorakit.SloraConfig(r=3, alpha=6, init="nlora", targets=["0"]))
    ad = adapter_of(model)
    sketch = ad.scale * ad.lora_B @ ad.lora_R @ ad.lora_A
    torch.testing.assert_close(sketch, w, atol=1e-4, rtol=1e-4)  # C W_IJ^+ R == W when rank(W) = r
    assert model[0].base_layer.weight.abs().max() < 1e-4  # the residual is (numerically) zero
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in lorakit.trainable_parameters(model).values()) == (10 + 12) * 3 + 9


def test_nlora_in_a_lora_xs_config_is_inttune_with_r_squared_parameters():
    model = linear()
    x = torch.randn(4, 12)
    expected = model(x)
    lorakit.adapt(model, lorakit.LoraXsConfig(r=4, init="nlora", targets=["0"]))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert [p.numel() for p in lorakit.trainable_parameters(model).values()] == [16]


# --- LoftQ -----------------------------------------------------------------------------------------------------
def test_loftq_error_decreases_with_iterations_and_beats_plain_quantisation():
    torch.manual_seed(0)
    w = torch.randn(32, 64) + torch.randn(32, 2) @ torch.randn(2, 64) * 3
    errors = []
    for iters in (1, 2, 4, 8):
        f = loftq(w, 4, 2.0, iters=iters)
        errors.append(torch.linalg.norm(w - f.base - 2.0 * f.b @ f.a).item())
    assert all(later <= earlier + 1e-5 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0] < torch.linalg.norm(w - fake_quantize(w)).item()


def test_loftq_replaces_the_base_with_the_quantised_weight():
    model = linear(16, 64)
    w = model[0].weight.detach().clone()
    lorakit.adapt(model, lorakit.LoraConfig(r=2, alpha=4, init="loftq", init_options={"iters": 3}, targets=["0"]))
    f = loftq(w, 2, 2.0, iters=3)
    torch.testing.assert_close(model[0].base_layer.weight.detach(), f.base)
    for block in model[0].base_layer.weight.detach().reshape(-1, 64):  # 16 NF4 levels per 64-value block
        assert block.unique().numel() <= 16


def test_nf4_round_trip_keeps_zero_and_is_finer_than_uniform_int4_on_gaussians():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    w[0, :3] = 0
    nf4 = fake_quantize(w)
    assert torch.equal(nf4[0, :3], torch.zeros(3))
    assert torch.linalg.norm(w - nf4) < torch.linalg.norm(w - fake_quantize(w, "uniform", 4))


# --- configs ---------------------------------------------------------------------------------------------------
def test_init_names_and_options_are_validated_with_the_allowed_values_listed():
    with pytest.raises(lorakit.ConfigError, match="init='nope'.*kaiming, gaussian, random, eva, loftq, lora-ga, olora"):
        lorakit.LoraConfig(init="nope")
    with pytest.raises(lorakit.ConfigError, match="init='lora-sb'"):  # three-factor init on a two-factor method
        lorakit.LoraConfig(init="lora-sb")
    with pytest.raises(lorakit.ConfigError, match="init='pissa'.*svd, lora-sb, nlora"):
        lorakit.LoraXsConfig(init="pissa")
    with pytest.raises(lorakit.ConfigError, match=r"init_options\['nitre'\].*options: niter, seed"):
        lorakit.LoraConfig(init="pissa", init_options={"nitre": 4})
    with pytest.raises(lorakit.ConfigError, match="init_options"):
        lorakit.LoraConfig(init="kaiming", init_options={"niter": 4})


def test_a_second_base_rewriting_adapter_on_a_layer_is_refused():
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(r=2, init="pissa", targets=["k_proj"]), "first")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(lorakit.LorakitError, match="'first' already rewrote the base weight"):
        lorakit.adapt(model, lorakit.LoraConfig(r=2, init="olora", targets=["q_proj", "k_proj"]), "second")
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # not even q_proj, checked first
    assert list(lorakit.configs(model)) == ["first"]  # the refused adapter left nothing behind
    lorakit.adapt(model, lorakit.LoraConfig(r=2, targets=["k_proj"]), "plain")  # an init that keeps the base is fine
    lorakit.adapt(model, lorakit.LoraConfig(r=2, init="pissa", targets=["v_proj"]), "other_layers")
