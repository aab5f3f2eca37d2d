"""GaLore / Fira / Natural GaLore: state shapes from the theory, AdamW equivalence under an exact projector,
subspace-confined updates, staggered refreshes, exact resumption from a weights_only checkpoint, per-layer mode,
Fira's residual and limiter, and Natural GaLore's Woodbury solve."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.optim import build_optimizer
from lorakit.optim.natural_galore import fisher_solve

VARIANTS = ["galore", "fira", "natural-galore"]


def mlp(seed: int = 0, widths: tuple[int, ...] = (24, 40, 16)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for d_in, d_out in zip(widths, widths[1:]):
        layers += [nn.Linear(d_in, d_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def batches(n: int, d_in: int = 24, d_out: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, d_in, generator=g), torch.randn(8, d_out, generator=g)) for _ in range(n)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list, zero: bool = True) -> None:
    for x, y in data:
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if zero:
            opt.zero_grad(set_to_none=True)


def test_state_has_the_shapes_the_theory_gives() -> None:
    model = mlp()  # weights (40, 24): right projection; (16, 40): left projection
    opt = build_optimizer("galore", dict(model.named_parameters()), lr=1e-2, rank=4)
    train(model, opt, batches(1))
    w1, b1, w2, b2 = model[0].weight, model[0].bias, model[2].weight, model[2].bias
    expect = {w1: ((40, 4), (24, 4)), w2: ((4, 40), (16, 4))}  # (moment (m, r) | (r, n), projector (min, r))
    for w, (moment, projector) in expect.items():
        state = opt.state[w]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == moment
        assert state["projector"].shape == projector
        stored = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
        assert stored == 2 * 4 * max(w.shape) + 4 * min(w.shape)  # 2 r max(m, n) + r min(m, n), not 2 m n
    for b in (b1, b2):  # vectors: plain AdamW moments
        assert opt.state[b]["exp_avg"].shape == b.shape and "projector" not in opt.state[b]


def test_fira_keeps_galore_memory_and_natural_galore_adds_s_gradients() -> None:
    shapes = {}
    for name in VARIANTS:
        model = mlp()
        opt = build_optimizer(name, dict(model.named_parameters()), lr=1e-2, rank=4, **(
            {"history": 3} if name == "natural-galore" else {}))
        train(model, opt, batches(1))
        shapes[name] = {k: tuple(v.shape) for k, v in opt.state[model[2].weight].items() if isinstance(v, torch.Tensor)}
    galore = shapes["galore"]
    assert {k: v for k, v in shapes["fira"].items() if k != "residual_norm"} == galore
    assert shapes["fira"]["residual_norm"] == ()
    assert shapes["natural-galore"]["history"] == (3, *galore["exp_avg"])


def _orthonormal_rows(m: int, n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:m].float()


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_galore_with_an_exact_full_rank_projector_is_adamw(shape: tuple[int, int]) -> None:
    """The first gradient's singular vectors are the coordinate axes, so P is a signed permutation; Adam is
    equivariant under those, so GaLore at r = min(m, n), scale 1 and no refresh must step exactly like AdamW."""
    m, n = shape
    r = min(m, n)
    diag = torch.diag(torch.arange(r, 0, -1).float())
    first = diag @ _orthonormal_rows(m, n, 0) if m <= n else _orthonormal_rows(n, m, 0).T @ diag
    g = torch.Generator().manual_seed(3)
    grads = [first] + [torch.randn(m, n, generator=g) for _ in range(5)]
    ours, ref = nn.Parameter(torch.randn(m, n)), None
    ref = nn.Parameter(ours.detach().clone())
    opt = build_optimizer("galore", {"w": ours}, lr=0.1, weight_decay=0.1, rank=r, scale=1.0, update_gap=1000)
    adamw = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.1)
    for grad in grads:
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        adamw.step()
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours.detach(), grads[0])  # it did move


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_between_refreshes_the_update_stays_in_the_projected_subspace(shape: tuple[int, int]) -> None:
    m, n = shape
    w = nn.Parameter(torch.randn(m, n))
    opt = build_optimizer("galore", {"w": w}, lr=0.1, rank=2, update_gap=100)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        before = w.detach().clone()
        w.grad = torch.randn(m, n, generator=g)
        opt.step()
        delta, p = w.detach() - before, opt.state[w]["projector"]
        outside = delta - p @ p.T @ delta if m <= n else delta - delta @ p @ p.T
        assert outside.abs().max() < 1e-5 * delta.abs().max()  # rounding of W (|W| ~ 1) only


def _projectors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [s["projector"].clone() for s in opt.state.values() if "projector" in s]


@pytest.mark.parametrize("stagger", [True, False])
def test_refreshes_are_staggered(stagger: bool) -> None:
    weights = {f"w{i}": nn.Parameter(torch.randn(5, 7)) for i in range(10)}
    gap = 4
    opt = build_optimizer("galore", weights, lr=0.01, rank=2, update_gap=gap, stagger=stagger)
    g = torch.Generator().manual_seed(0)
    per_step = []
    for step in range(3 * gap + 1):
        before = _projectors(opt)
        for w in weights.values():
            w.grad = torch.randn(5, 7, generator=g)
        opt.step()
        if step:
            per_step.append(sum(not torch.equal(a, b) for a, b in zip(before, _projectors(opt))))
    assert sum(per_step) == 3 * len(weights)  # every tensor refreshed once per window of `gap` steps
    if stagger:
        assert max(per_step) <= math.ceil(len(weights) / gap)
    else:
        assert max(per_step) == len(weights)  # GaLore's spike


@pytest.mark.parametrize("name", VARIANTS)
def test_resuming_from_a_weights_only_checkpoint_continues_identically(name: str) -> None:
    data = batches(8)
    options = {"rank": 3, "update_gap": 3}
    straight = mlp()
    opt = build_optimizer(name, dict(straight.named_parameters()), lr=1e-2, weight_decay=0.01, **options)
    train(straight, opt, data)

    first = mlp()
    opt = build_optimizer(name, dict(first.named_parameters()), lr=1e-2, weight_decay=0.01, **options)
    train(first, opt, data[:4])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = mlp(seed=5)
    resumed.load_state_dict(saved["model"])
    opt = build_optimizer(name, dict(resumed.named_parameters()), lr=1e-2, weight_decay=0.01, **options)
    opt.load_state_dict(saved["optimizer"])
    train(resumed, opt, data[4:])
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", VARIANTS)
def test_per_layer_mode_matches_the_normal_step_and_holds_one_gradient(name: str) -> None:
    data = batches(5)
    normal = mlp()
    train(normal, build_optimizer(name, dict(normal.named_parameters()), lr=1e-2, rank=3, update_gap=2), data)
    layered = mlp()
    opt = build_optimizer(name, dict(layered.named_parameters()), lr=1e-2, rank=3, update_gap=2, per_layer=True)
    alive: list[int] = []
    step_parameter = opt.step_parameter

    def counting(param: torch.Tensor) -> None:
        alive.append(sum(p.grad is not None for p in layered.parameters()))
        step_parameter(param)

    opt.step_parameter = counting
    train(layered, opt, data, zero=False)
    assert all(p.grad is None for p in layered.parameters())
    assert alive and max(alive) == 1
    for a, b in zip(normal.parameters(), layered.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _residuals(limit: float) -> tuple[list[float], list[torch.Tensor]]:
    """Fira on gradients whose part outside the rank-2 subspace spikes at step 3; returns ||S_t|| recovered from the
    applied update, and the updates."""
    w = nn.Parameter(torch.randn(6, 12))
    opt = build_optimizer("fira", {"w": w}, lr=1.0, rank=2, scale=1.0, update_gap=100, limit=limit)
    g = torch.Generator().manual_seed(0)
    low = torch.randn(6, 2, generator=g) @ torch.randn(2, 12, generator=g)
    norms, deltas = [], []
    for t in range(6):
        before = w.detach().clone()
        w.grad = low + (0.01 if t < 3 else 1.0) * torch.randn(6, 12, generator=g)
        opt.step()
        delta = before - w.detach()  # = P psi(R) + S_t
        p = opt.state[w]["projector"]
        norms.append(float((delta - p @ p.T @ delta).norm()))
        deltas.append(delta)
    return norms, deltas


def test_fira_limiter_bounds_the_growth_of_the_residual() -> None:
    norms, deltas = _residuals(limit=1.01)
    assert all(b <= 1.01 * a * (1 + 1e-5) for a, b in zip(norms, norms[1:]))
    unlimited, _ = _residuals(limit=1e9)
    assert max(b / a for a, b in zip(unlimited, unlimited[1:])) > 10  # without the limiter the residual jumps
    assert all(int(torch.linalg.matrix_rank(d)) > 2 for d in deltas)  # full-rank update from rank-2 state


def test_fira_without_residual_equals_galore() -> None:
    """Gradients inside the projected subspace leave no residual, so Fira's update is GaLore's exactly."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 2, generator=g))[0]
    grads = [basis @ torch.randn(2, 9, generator=g) for _ in range(3)]
    results = []
    for name in ("galore", "fira"):
        w = nn.Parameter(torch.ones(6, 9))
        opt = build_optimizer(name, {"w": w}, lr=0.1, rank=2, update_gap=100)
        for grad in grads:
            w.grad = grad.clone()
            opt.step()
        results.append(w.detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-5)


def test_natural_galore_woodbury_equals_the_explicit_inverse() -> None:
    g = torch.Generator().manual_seed(0)
    history = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    grad = torch.randn(3, 5, generator=g, dtype=torch.float64)
    h = history.reshape(4, -1).T  # (rn, k)
    fisher = 0.1 * torch.eye(15, dtype=torch.float64) + h @ h.T / 4
    expected = torch.linalg.solve(fisher, grad.reshape(-1)).reshape(3, 5)
    torch.testing.assert_close(fisher_solve(history, grad, 0.1), expected)


@pytest.mark.parametrize("name", VARIANTS)
def test_the_family_lowers_a_loss(name: str) -> None:
    model, data = mlp(), batches(1) * 30
    opt = build_optimizer(name, dict(model.named_parameters()), lr=3e-2, rank=4, update_gap=10)
    x, y = data[0]
    before = float(nn.functional.mse_loss(model(x), y).detach())
    train(model, opt, data)
    assert float(nn.functional.mse_loss(model(x), y).detach()) < 0.6 * before


@pytest.mark.parametrize("options, field", [({"rank": 0}, "rank"), ({"update_gap": 0}, "update_gap"),
                                            ({"bogus": 1}, "bogus"), ({"scale": -1.0}, "scale")])
def test_bad_options_are_refused(options: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        build_optimizer("galore", dict(mlp().named_parameters()), lr=1e-3, **options)


def test_bad_variant_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="limit"):
        build_optimizer("fira", dict(mlp().named_parameters()), lr=1e-3, limit=0.5)
    with pytest.raises(ConfigError, match="history"):
        build_optimizer("natural-galore", dict(mlp().named_parameters()), lr=1e-3, history=0)
    with pytest.raises(ConfigError, match="per-layer"):
        from lorakit.optim import per_layer_updates
        per_layer_updates(torch.optim.SGD(mlp().parameters(), lr=0.1))


def test_per_layer_mode_reads_the_learning_rate_of_the_current_param_groups() -> None:
    """After load_state_dict (which replaces the group dicts) a scheduler's lr change must still apply."""
    model = mlp()
    opt = build_optimizer("galore", dict(model.named_parameters()), lr=1e-2, rank=3, per_layer=True)
    train(model, opt, batches(1), zero=False)
    opt.load_state_dict(opt.state_dict())
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, batches(1), zero=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
