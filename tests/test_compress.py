"""Low-rank decomposition of one linear layer (LORD, METHODS.md entry 67; Greenformers, entry 68): exactness at full
rank, Eckart--Young, parameter counts, the energy rule, the data-aware methods' objectives, errors, and training the
factored layer (alone and under lorakit's adapters)."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import lorakit
from lorakit.compress import FactoredLinear, break_even, choose_rank, decompose
from lorakit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_of(f: FactoredLinear) -> Tensor:
    return f.up.weight @ f.down.weight


def unequal_inputs(n: int, d_in: int, seed: int) -> Tensor:
    """Inputs whose features' scales span four orders of magnitude (activation outliers)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen) * torch.logspace(-2, 2, d_in)


@pytest.mark.parametrize("method", ["svd", "activation-rms", "activation-gram", "fisher-rows", "fisher-full"])
def test_full_rank_reproduces_the_layer(method: str) -> None:
    layer = nn.Linear(40, 24)
    x = unequal_inputs(64, 40, 0)
    stats = {"svd": None, "activation-rms": x.pow(2).mean(0).sqrt(), "activation-gram": x.T @ x,
             "fisher-rows": torch.rand(24) + 0.1, "fisher-full": torch.rand(24, 40)}[method]
    f = decompose(layer, method=method.split("-")[0], stats=stats)
    assert f.rank == 24 and f.has_bias
    with torch.no_grad():
        torch.testing.assert_close(f(x), layer(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f.to_linear().weight, layer.weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 5, 11])
def test_spectral_error_is_the_next_singular_value_and_parameters_are_k_m_plus_n(k: int) -> None:
    w = torch.randn(20, 36, dtype=torch.float64)
    f = decompose(w, rank=k)
    sigma = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.matrix_norm(w - dense_of(f).detach(), ord=2), sigma[k])
    assert f.num_parameters == k * (20 + 36) == sum(p.numel() for p in f.parameters())
    with_bias = decompose(nn.Linear(36, 20), rank=k)
    assert with_bias.num_parameters == k * 56 + 20 == sum(p.numel() for p in with_bias.parameters())


def test_energy_keeps_the_fewest_directions_holding_the_share() -> None:
    spectrum = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5])
    share = torch.cumsum(spectrum**2, 0) / (spectrum**2).sum()  # 0.727, 0.909, 0.955, 1.0-, 1.0
    for energy in (0.5, 0.72, 0.91, 0.95, 0.99, 1.0):
        k = choose_rank(spectrum, energy=energy)
        assert share[k - 1] >= energy - 1e-7 and (k == 1 or share[k - 2] < energy)
    assert choose_rank(spectrum, rank=4, energy=0.5) == 1 and choose_rank(spectrum, rank=2, energy=0.99) == 2
    w = torch.randn(16, 30)
    f = decompose(w, energy=0.8)
    s = torch.linalg.svdvals(w)
    assert f.rank == int((torch.cumsum(s**2, 0) / (s**2).sum() < 0.8).sum()) + 1


def test_activation_aware_beats_plain_svd_on_output_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 48)
    calib, held_out = unequal_inputs(512, 48, 1), unequal_inputs(512, 48, 2)

    def output_error(f: FactoredLinear) -> float:
        return float((held_out @ (w - dense_of(f)).T).norm() / (held_out @ w.T).norm())

    plain = output_error(decompose(w, rank=6))
    gram = output_error(decompose(w, rank=6, method="activation", stats=calib.T @ calib))
    rms = output_error(decompose(w, rank=6, method="activation", stats=calib.pow(2).mean(0).sqrt()))
    assert gram < 0.5 * plain and rms < 0.5 * plain


def test_fisher_beats_plain_svd_on_the_fisher_weighted_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 24)
    importance = torch.logspace(-3, 3, 32)[torch.randperm(32)]  # summed squared gradients per row

    def weighted_error(f: FactoredLinear) -> float:
        return float((importance[:, None] * (w - dense_of(f)) ** 2).sum())

    plain = weighted_error(decompose(w, rank=5))
    fisher = weighted_error(decompose(w, rank=5, method="fisher", stats=importance))
    per_entry = weighted_error(decompose(w, rank=5, method="fisher", stats=importance[:, None].expand(32, 24) / 24))
    assert fisher < 0.5 * plain
    assert per_entry == pytest.approx(fisher, rel=1e-4)  # the (d_out, d_in) form reduces to the same row sums


@pytest.mark.parametrize("call, field", [
    (lambda: decompose(nn.Linear(8, 6), rank=7), "rank="),
    (lambda: decompose(nn.Linear(8, 6), rank=0), "rank="),
    (lambda: decompose(nn.Linear(8, 6), energy=0.0), "energy="),
    (lambda: decompose(nn.Linear(8, 6), energy=1.5), "energy="),
    (lambda: decompose(torch.randn(2, 3, 4), rank=1), "weight="),
    (lambda: decompose(nn.Linear(8, 6), method="pca"), "method="),
    (lambda: decompose(nn.Linear(8, 6), method="activation"), "stats="),
    (lambda: decompose(nn.Linear(8, 6), method="activation", stats=torch.ones(6)), "stats="),
    (lambda: decompose(nn.Linear(8, 6), method="fisher", stats=torch.zeros(6)), "stats="),
    (lambda: decompose(nn.Linear(8, 6), method="fisher", stats=-torch.ones(6)), "stats="),
    (lambda: decompose(nn.Linear(8, 6), method="svd", stats=torch.ones(8)), "stats="),
])
def test_bad_arguments_name_the_field_and_the_rule(call, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        call()


def test_break_even_is_where_factoring_stops_saving() -> None:
    assert break_even(576, 1536) == pytest.approx(576 * 1536 / 2112)
    for k in (10, 11, 12):  # 24 x 40: break-even 15
        saves = decompose(nn.Linear(40, 24, bias=False), rank=k).num_parameters < 24 * 40
        assert saves == (k < break_even(40, 24))
    assert decompose(nn.Linear(40, 24, bias=False), rank=15).num_parameters == 24 * 40


def test_factored_layer_trains_in_factored_form() -> None:
    torch.manual_seed(0)
    teacher, student = nn.Linear(20, 12), decompose(nn.Linear(20, 12), rank=4)
    x = torch.randn(128, 20)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = (student(x) - teacher(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert FactoredLinear.from_linear(teacher, rank=3).rank == 3


def test_lora_adapts_both_factors_and_trains_on_top() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(decompose(nn.Linear(16, 16), rank=4), nn.ReLU(), nn.Linear(16, 4))
    lorakit.adapt(model, lorakit.LoraConfig(r=2, targets="all-linear", init="gaussian"))
    hosted = {path for path, m in model.named_modules() if type(m).__name__ == "HostLayer"}
    assert hosted == {"0.down", "0.up", "2"}
    trainable = lorakit.trainable_parameters(model)
    assert any(k.startswith("0.down.") for k in trainable) and any(k.startswith("0.up.") for k in trainable)
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if "base_layer" in k}
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = (model(x) - y).pow(2).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    for k, v in model.state_dict().items():  # the factored base stays frozen under LoRA
        if k in before:
            torch.testing.assert_close(v, before[k])
    assert model[0].num_parameters == 4 * 32 + 16
