"""Training rules: LoRA+ and ALLoRA take the step their formulas give (checked against a hand-written Adam), GGPO
restores the weights bit for bit after each step, PEGO's regulariser vanishes exactly for orthogonal adapters."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import Net

import lorakit
from lorakit.errors import ConfigError, LorakitError
from lorakit.hooks import HookList
from lorakit.inject import hosts
from lorakit.optim import build_optimizer
from lorakit.rank.ggpo import GgpoHook
from lorakit.rank.pego import PegoHook, pego_penalty

LR, BETAS, EPS = 0.1, (0.9, 0.999), 1e-8


def tiny(method: str = "lora", names: tuple[str, ...] = ("default",), **fields) -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    model = Net(nn.Linear(4, 3))
    for name in names:
        lorakit.adapt(model, lorakit.build_config(method, targets=["layer"], r=2, **fields), name)
    with torch.no_grad():
        for p in lorakit.trainable_parameters(model).values():
            p.normal_()  # non-zero B so A gets a gradient
    return model, torch.randn(5, 4)


def adam_steps(grads: list[torch.Tensor], lr: float) -> torch.Tensor:
    """The total change textbook Adam makes over ``grads`` (bias-corrected, no weight decay)."""
    m = v = torch.zeros_like(grads[0])
    total = torch.zeros_like(grads[0])
    for t, g in enumerate(grads, start=1):
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        total -= lr * (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
    return total


def factors(model: Net) -> tuple[nn.Parameter, nn.Parameter]:
    adapter = model.layer.adapters["default"]
    return adapter.lora_A.weight, adapter.lora_B.weight


def test_loraplus_trains_b_at_ratio_times_the_learning_rate() -> None:
    model, x = tiny()
    a, b = factors(model)
    roles = lorakit.inject.parameter_roles(model)
    assert roles == {"layer.adapters.default.lora_B.weight": "up"}
    opt = build_optimizer("loraplus", lorakit.trainable_parameters(model), lr=LR, ratio=4.0, roles=roles)
    a0, b0 = a.detach().clone(), b.detach().clone()
    ga, gb = [], []
    for _ in range(2):
        model(x).pow(2).sum().backward()
        ga.append(a.grad.clone())
        gb.append(b.grad.clone())
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(a - a0, adam_steps(ga, LR), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b - b0, adam_steps(gb, 4.0 * LR), atol=1e-6, rtol=1e-5)


def test_allora_scales_each_rows_step_by_its_norm_coefficient() -> None:
    model, x = tiny(alpha=2.0)
    a, b = factors(model)
    with torch.no_grad():
        b[1].zero_()  # a row at zero moves eta times Adam's step
    eta = 3.0
    opt = build_optimizer("allora", lorakit.trainable_parameters(model), lr=LR, eta=eta)
    a0, b0 = a.detach().clone(), b.detach().clone()
    model(x).pow(2).sum().backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    opt.step()
    for p, p0, g in ((a, a0, ga), (b, b0, gb)):
        for row in range(p.shape[0]):
            c = 1.0 / torch.sqrt(p0[row].pow(2).sum() + 1.0 / eta ** 2)
            torch.testing.assert_close(p[row] - p0[row], c * adam_steps([g[row]], LR), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b[1] - b0[1], eta * adam_steps([gb[1]], LR), atol=1e-6, rtol=1e-5)


def test_update_rule_options_are_checked() -> None:
    model, _ = tiny()
    named = lorakit.trainable_parameters(model)
    with pytest.raises(ConfigError, match="no option"):
        build_optimizer("loraplus", named, lr=LR, ratioo=2.0)
    with pytest.raises(ConfigError, match="ratio"):
        build_optimizer("loraplus", named, lr=LR, ratio=0.0)
    with pytest.raises(ConfigError, match="eta"):
        build_optimizer("allora", named, lr=LR, eta=-1.0)
    with pytest.raises(ConfigError, match="no up-projection"):
        build_optimizer("loraplus", named, lr=LR, roles=None)


@pytest.mark.parametrize("method,up", [("lora", "lora_embedding_B"), ("sora", "lora_B"), ("slora", "lora_B"),
                                       ("dylora", "lora_embedding_B"), ("bone", None)])
def test_up_projections_are_declared_by_each_method(method, up) -> None:
    """LoRA+'s B factors come from the adapters' protocol (``up_projections``), whatever the tensors' names."""
    model = Net(nn.Embedding(20, 8))
    if method == "bone":
        model = Net(nn.Linear(8, 8))
    lorakit.adapt(model, lorakit.build_config(method, targets=["layer"]))
    roles = lorakit.inject.parameter_roles(model)
    assert roles == ({} if up is None else {f"layer.adapters.default.{up}": "up"})
    assert set(roles) <= set(lorakit.trainable_parameters(model))


def ggpo_step(model: Net, x: torch.Tensor, hooks: HookList, opt: torch.optim.Optimizer, step: int) -> None:
    hooks.before_forward(model, step)
    model(x).pow(2).sum().backward()
    hooks.before_step(model, opt, step)
    opt.step()
    opt.zero_grad(set_to_none=True)
    hooks.after_step(model, opt, step + 1)


def test_ggpo_perturbs_the_forward_and_restores_the_weights_exactly() -> None:
    model, x = tiny()
    params = lorakit.trainable_parameters(model)
    opt = torch.optim.SGD(list(params.values()), lr=0.0)  # lr 0: any change left after the step is the hook's
    hook = GgpoHook(alpha=0.5, beta=0.5)
    hooks = HookList([hook])
    for step in range(3):
        before = {k: p.detach().clone() for k, p in params.items()}
        hook.before_forward(model, step)
        assert any(not torch.equal(p, before[k]) for k, p in params.items()), "weights must be perturbed"
        model(x).pow(2).sum().backward()
        hooks.before_step(model, opt, step)
        for k, p in params.items():
            assert torch.equal(p, before[k])  # bit-exact restore before the optimizer step
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert hook.grad_norms  # the next perturbation is guided by these gradients


def test_ggpo_with_zero_magnitude_is_plain_training() -> None:
    runs = []
    for hooks in (HookList([GgpoHook(alpha=0.0, beta=0.0)]), HookList()):
        model, x = tiny()
        opt = torch.optim.AdamW(list(lorakit.trainable_parameters(model).values()), lr=LR)
        for step in range(3):
            ggpo_step(model, x, hooks, opt, step)
        runs.append([p.detach().clone() for p in lorakit.trainable_parameters(model).values()])
    for p, q in zip(*runs):
        assert torch.equal(p, q)


def orthogonal_group() -> tuple[Net, torch.Tensor]:
    """Base rows span e0, e1; adapter a's A rows are e2, e3; adapter b's are e4, e5 (d_in = 6)."""
    torch.manual_seed(0)
    model = Net(nn.Linear(6, 2))
    eye = torch.eye(6)
    with torch.no_grad():
        model.layer.weight.copy_(torch.randn(2, 2) @ eye[:2])
    for name, rows in (("a", eye[2:4]), ("b", eye[4:6])):
        lorakit.adapt(model, lorakit.LoraConfig(r=2, targets=["layer"]), name)
        with torch.no_grad():
            model.layer.adapters[name].lora_A.weight.copy_(rows * 1.5)
            model.layer.adapters[name].lora_B.weight.normal_()
    return model, torch.randn(3, 6)


def test_pego_regulariser_is_zero_for_orthogonal_adapters_and_matches_its_formula_otherwise() -> None:
    model, x = orthogonal_group()
    assert float(pego_penalty(model, ["a", "b"]).detach()) == 0.0
    a, b = model.layer.adapters["a"].lora_A.weight, model.layer.adapters["b"].lora_A.weight
    w0 = model.layer.base_layer.weight
    with torch.no_grad():
        b[0] += a[0] + w0[0]  # overlap with adapter a and with the base
    a, b = a.detach(), b.detach()
    expected = sum(float((m @ w0.t()).pow(2).sum()) for m in (a, b)) + 2 * float((a @ b.t()).pow(2).sum())
    assert expected > 0
    torch.testing.assert_close(pego_penalty(model, ["a", "b"]).detach(), torch.tensor(expected), rtol=1e-5, atol=0)
    hook = PegoHook(["a", "b"], base_weight=2.0, group_weight=0.0)
    base_only = 2.0 * sum(float((m @ w0.t()).pow(2).sum()) for m in (a, b))
    torch.testing.assert_close(hook.regulariser(model).detach(), torch.tensor(base_only), rtol=1e-5, atol=0)


def test_a_pego_group_on_one_layer_is_the_sum_of_its_deltas_and_merges_to_the_base_size() -> None:
    model, x = orthogonal_group()
    lorakit.set_active(model, ["a", "b"])
    host = next(iter(hosts(model)))
    dw = sum(host.adapters[n].delta_weight(host.backend) for n in ("a", "b"))
    expected = x @ (model.layer.base_layer.weight + dw).t() + model.layer.base_layer.bias
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    size = sum(p.numel() for p in model.layer.base_layer.parameters())
    lorakit.unload(model, merge_active=True)
    assert sum(p.numel() for p in model.parameters()) == size
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(LorakitError, match="no layer"):
        pego_penalty(model, ["a"])
