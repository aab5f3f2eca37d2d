"""SVFit and LoLDU: frozen decomposed bases with a trainable diagonal (METHODS.md entries 25, 26)."""
from __future__ import annotations

import torch
from torch import nn

import lorakit
from lorakit.methods.loldu import ldu


def layer(d_out: int = 10, d_in: int = 12) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, d_out))


def test_svfit_trains_the_top_singular_values_with_the_projected_gradient():
    model = layer()
    w = model[0].weight.detach().clone()
    x = torch.randn(6, 12)
    lorakit.adapt(model, lorakit.SvfitConfig(r=3, targets=["0"]))
    ad = model[0].adapters["default"]
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(ad.lora_S.detach(), s[:3])
    assert [p.numel() for p in lorakit.trainable_parameters(model).values()] == [3]
    model[0].base_layer.weight.requires_grad_(True)
    model(x).pow(2).sum().backward()
    g = model[0].base_layer.weight.grad  # dL/dW at init (the adapter adds nothing yet)
    torch.testing.assert_close(ad.lora_S.grad, torch.einsum("ri,ij,rj->r", u[:, :3].t(), g, vh[:3]),
                               atol=1e-5, rtol=1e-4)  # dL/ds_i = u_i^T G v_i
    with torch.no_grad():
        ad.lora_S.mul_(1.5)
    w_new = w + ad.delta_weight(model[0].backend)
    torch.testing.assert_close(u[:, :3].t() @ w_new @ vh[:3].t(), torch.diag(1.5 * s[:3]), atol=1e-5, rtol=1e-5)


def test_svfit_energy_rule_picks_the_fewest_values_holding_the_share():
    model = layer()
    with torch.no_grad():
        u, _, vh = torch.linalg.svd(model[0].weight)
        model[0].weight.copy_(u[:, :4] * torch.tensor([10.0, 5.0, 1.0, 0.1]) @ vh[:4])
    lorakit.adapt(model, lorakit.SvfitConfig(r=8, energy=0.99, targets=["0"]))
    assert model[0].adapters["default"].lora_S.numel() == 2  # (100 + 25) / 126.01 >= 0.99 > 100 / 126.01


def test_loldu_decomposition_trains_r_plus_one_parameters_on_rectangular_weights():
    for d_out, d_in in ((10, 6), (6, 10)):
        model = layer(d_out, d_in)
        w = model[0].weight.detach().clone()
        p, lower, d, upper = ldu(w)
        assert torch.equal(p.sum(0), torch.ones(d_out)) and torch.equal(p.sum(1), torch.ones(d_out))
        assert set(p.unique().tolist()) == {0.0, 1.0}  # P is a permutation
        torch.testing.assert_close(torch.diagonal(upper), torch.ones(min(d_out, d_in)))  # unit upper triangular
        torch.testing.assert_close(p @ lower @ torch.diag(d) @ upper, w, atol=1e-5, rtol=1e-5)
        x = torch.randn(3, d_in)
        expected = model(x)
        lorakit.adapt(model, lorakit.LolduConfig(r=4, alpha=8, targets=["0"]))
        ad = model[0].adapters["default"]
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
        assert sum(t.numel() for t in lorakit.trainable_parameters(model).values()) == 4 + 1
        assert ad.lora_sigma.item() == 2.0  # alpha / r
        with torch.no_grad():
            ad.lora_z.mul_(2.0)
        r_part = (p @ lower[:, :4]) @ torch.diag(d[:4]) @ upper[:4]
        torch.testing.assert_close(ad.delta_weight(model[0].backend), 2.0 * r_part, atol=1e-5, rtol=1e-5)
