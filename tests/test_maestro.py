"""Maestro (lorakit.compress.maestro): ordered dropout on trainable low-rank layers, truncation, the group lasso."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import tiny_llama

from lorakit.compress.maestro import MaestroLinear, OrderedDropout, maestro_layers, maestro_model, truncate_model
from lorakit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def relative_error(layer: MaestroLinear, target: torch.Tensor) -> float:
    return float((layer.u @ layer.v - target).norm() / target.norm())


def test_components_beyond_the_sampled_rank_get_exactly_zero_gradient() -> None:
    layer = MaestroLinear(12, 10, 8)
    hook = OrderedDropout(seed=3)
    checked = 0
    for step in range(6):
        hook.before_forward(layer, step)
        k = layer.sampled
        layer(torch.randn(5, 12)).pow(2).sum().backward()
        assert bool((layer.u.grad[:, k:] == 0).all() and (layer.v.grad[k:] == 0).all())
        assert bool((layer.u.grad[:, :k] != 0).all() and (layer.v.grad[:k] != 0).any())
        checked += k < 8
        layer.zero_grad()
        hook.after_step(layer, torch.optim.SGD(layer.parameters()), step + 1)
        assert layer.sampled is None
    assert checked >= 3
    layer.sampled = 2
    layer.eval()  # evaluation always uses every component
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), x @ (layer.u @ layer.v).T + layer.bias)


def train(ordered: bool, target: torch.Tensor, steps: int = 300) -> MaestroLinear:
    data = torch.Generator().manual_seed(1)
    torch.manual_seed(0)  # the same initial factors with and without ordered dropout
    layer = MaestroLinear(16, 16, 8, bias=False)
    hook = OrderedDropout(seed=0)
    optimizer = torch.optim.Adam(layer.parameters(), lr=5e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        if ordered:
            hook.before_forward(layer, step)
        x = torch.randn(256, 16, generator=data)  # isotropic inputs
        (layer(x) - x @ target.T).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        hook.after_step(layer, optimizer, step + 1)
    return layer


def test_ordered_dropout_learns_the_ordering_of_a_rank_3_map() -> None:
    g = torch.Generator().manual_seed(0)
    target = (torch.randn(16, 3, generator=g) @ torch.randn(3, 16, generator=g)) / 3 ** 0.5
    ordered, plain = train(True, target), train(False, target)
    full, cut = relative_error(ordered, target), relative_error(ordered.truncate(3), target)
    assert full < 0.05 and cut < full + 0.1
    assert relative_error(plain, target) < 0.05 and relative_error(plain.truncate(3), target) > 0.5
    # the leading components are the SVD's, in order (Eckart-Young optimum of each truncation)
    s = torch.linalg.svdvals(target)
    for k in (1, 2):
        assert relative_error(ordered.truncate(k), target) == pytest.approx(float(s[k:].norm() / s.norm()), abs=0.02)


@torch.no_grad()
def test_svd_init_and_truncation() -> None:
    linear = nn.Linear(12, 10)
    x = torch.randn(4, 12)
    torch.testing.assert_close(MaestroLinear.from_linear(linear, 10)(x), linear(x), rtol=1e-5, atol=1e-5)
    layer = MaestroLinear.from_linear(linear, 6)
    p, s, qt = torch.linalg.svd(linear.weight)
    cut = layer.truncate(4)
    torch.testing.assert_close(cut.u @ cut.v, p[:, :4] * s[:4] @ qt[:4], rtol=1e-5, atol=1e-5)  # best rank 4
    torch.testing.assert_close(cut.bias, linear.bias)
    bare = MaestroLinear(12, 10, 8, bias=False)
    for k in (1, 3, 8):
        assert sum(t.numel() for t in bare.truncate(k).parameters()) == k * (12 + 10)
    with pytest.raises(ConfigError, match="k=9"):
        bare.truncate(9)


def test_penalty_is_the_hierarchical_group_lasso() -> None:
    layer = MaestroLinear(7, 5, 4)
    want = sum(layer.u[:, b:].norm() + layer.v[b:].norm() for b in range(4))
    torch.testing.assert_close(layer.penalty(), want)
    model = nn.Sequential(layer, nn.ReLU(), MaestroLinear(5, 3, 2))
    reg = OrderedDropout(penalty=0.1).regulariser(model)
    torch.testing.assert_close(reg, 0.1 * (layer.penalty() + model[2].penalty()))
    reg.backward()  # trailing components sit in more groups: a larger pull per unit norm
    shrink = layer.u.grad.norm(dim=0) / layer.u.norm(dim=0)
    assert bool((shrink[1:] > shrink[:-1]).all())
    assert OrderedDropout().regulariser(model) is None


def test_maestro_model_replaces_targets_and_resumes_sampling() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
    maestro_model(model, 64, ["gate_proj", "up_proj"])  # full rank (32): exact
    layers = maestro_layers(model)
    assert [p for p, _ in layers] == [f"model.layers.{i}.mlp.{n}" for i in (0, 1) for n in ("gate_proj", "up_proj")]
    assert all(layer.rank == 32 for _, layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
    truncate_model(model, 5)
    assert all(layer.rank == 5 for _, layer in maestro_layers(model))

    hook = OrderedDropout(seed=7)
    hook.before_forward(model, 0)
    state = hook.state_dict()
    hook.before_forward(model, 1)
    again = OrderedDropout(seed=99)
    again.load_state_dict(state, model)
    again.before_forward(model, 1)
    assert again.last == hook.last and 1 <= hook.metrics()["maestro/mean_rank"] <= 5
    with pytest.raises(ConfigError, match="Maestro replaces plain nn.Linear"):
        maestro_model(model, 4, ["mlp"])
    with pytest.raises(ConfigError, match="matched no module"):
        maestro_model(model, 4, ["nothing"])
