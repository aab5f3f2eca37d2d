"""Adapter scale / learning-rate schedules and staged layer-range training (lorakit.schedules), and set_scale."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from zoo import net

import lorakit
from lorakit.errors import ConfigError, LorakitError
from lorakit.hooks import HookList
from lorakit.inject import hosts
from lorakit.schedules import AdapterSchedule, Constant, Cosine, Cyclical, LinearWarmup, StagedLayers

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(0))


def _linear(config: lorakit.AdapterConfig, names: tuple[str, ...] = ("a",)) -> nn.Module:
    model, _ = net("linear")
    for name in names:
        lorakit.adapt(model, config, name)
    return model.eval()


# (model, input, how the forward runs): each path that computes an adapter's contribution
def _fused():
    return _linear(lorakit.LoraConfig(r=2, targets=["layer"], init="random")), X, None


def _unfused_dora():
    return _linear(lorakit.DoraConfig(r=2, targets=["layer"], init="random")), X, None


def _conv():
    model, x = net("conv2d")
    return lorakit.adapt(model, lorakit.LoraConfig(r=2, targets=["layer"], init="random"), "a").eval(), x, None


def _rows_grouped():
    model = _linear(lorakit.LoraConfig(r=2, targets=["layer"], init="random"), ("a", "b"))
    return model, X, lambda: lorakit.route(model, ["a", "b", "a", None])


def _rows_segments():
    model = _linear(lorakit.DoraConfig(r=2, targets=["layer"], init="random"), ("a", "b"))
    return model, X, lambda: lorakit.route(model, ["a", "b", "a", None])


def _mixed():
    model = _linear(lorakit.LoraConfig(r=2, targets=["layer"], init="random"), ("a", "b"))
    return model, X, lambda: lorakit.mix(model, ["a", "b"], torch.tensor([0.7, 0.0]))


PATHS = {"fused": _fused, "dora": _unfused_dora, "conv": _conv, "rows_grouped": _rows_grouped,
         "rows_segments": _rows_segments, "mixed": _mixed}


def _run(model: nn.Module, x: torch.Tensor, routing) -> torch.Tensor:
    if routing is None:
        return model(x)
    with routing():
        return model(x)


@pytest.mark.parametrize("path", PATHS)
def test_the_scale_reaches_the_output_exactly(path: str) -> None:
    """``out(s) - base == s (out(1) - base)``, and the gradient of the adapters' tensors scales by ``s``."""
    model, x, routing = PATHS[path]()
    names = list(lorakit.configs(model))
    if path == "fused":
        host = next(hosts(model))
        assert host.adapters["a"].fused_forward(x, host.backend) is not None  # the fused kernel runs at scale 1
    with lorakit.disable(model):
        base = model(x).detach()
    weight = torch.randn(base.shape, generator=torch.Generator().manual_seed(2))
    grads = {}
    for s in (1.0, 0.3, -2.0):
        lorakit.set_scale(model, names, s)
        model.zero_grad()
        out = _run(model, x, routing)
        (out * weight).sum().backward()
        grads[s] = {k: p.grad.clone() for k, p in lorakit.trainable_parameters(model).items() if p.grad is not None}
        if s == 1.0:
            delta = out.detach() - base
        else:
            torch.testing.assert_close(out.detach() - base, s * delta, atol=1e-5, rtol=1e-4)
            for k, g in grads[s].items():
                if path != "dora" or "lora_B" in k:  # DoRA's magnitude also acts on W0: its gradient is not linear
                    torch.testing.assert_close(g, s * grads[1.0][k], atol=1e-5, rtol=1e-4)
    lorakit.set_scale(model, names, 0.0)
    with lorakit.disable(model):
        base_again = model(x)
    torch.testing.assert_close(_run(model, x, routing), base_again)


def test_set_scale_restores_in_a_block_and_refuses_what_it_cannot_honour() -> None:
    model = _linear(lorakit.LoraConfig(r=2, targets=["layer"], init="random"))
    full = model(X)
    with lorakit.set_scale(model, "a", 0.5):
        assert not torch.allclose(model(X), full)
    torch.testing.assert_close(model(X), full)
    with pytest.raises(ConfigError, match="finite"):
        lorakit.set_scale(model, "a", math.nan)
    with pytest.raises(LorakitError, match="unknown adapter"):
        lorakit.set_scale(model, "zz", 0.5)
    lorakit.set_scale(model, "a", 0.5)
    with pytest.raises(LorakitError, match="set_scale"):
        lorakit.merge(model)
    lorakit.set_scale(model, "a", 1.0)
    lorakit.merge(model)
    with pytest.raises(LorakitError, match="merged"):
        lorakit.set_scale(model, "a", 0.5)


def test_schedule_values_equal_their_formulas() -> None:
    assert [Constant(0.3)(t) for t in (0, 7)] == [0.3, 0.3]
    warm = LinearWarmup(steps=4, start=0.2, end=1.0)
    assert [warm(t) for t in (0, 2, 4, 9)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    cos = Cosine(steps=10, start=1.0, end=0.1)
    assert [cos(t) for t in (0, 5, 10, 20)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    warm_cos = Cosine(steps=12, start=2.0, end=0.0, warmup=2)
    assert [warm_cos(t) for t in (0, 1, 2, 7, 12)] == pytest.approx([0.0, 1.0, 2.0, 1.0, 0.0])
    cyc = Cyclical(period=8, low=0.25, high=1.0)
    assert [cyc(t) for t in (0, 2, 4, 6, 8, 12)] == pytest.approx([0.25, 0.625, 1.0, 0.625, 0.25, 1.0])
    # the same triangle as PyTorch's CyclicLR (mode "triangular", half a period up, half down)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.25)
    torch_cyc = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.25, max_lr=1.0, step_size_up=4, cycle_momentum=False)
    for t in range(20):
        assert cyc(t) == pytest.approx(torch_cyc.get_last_lr()[0])
        opt.step(), torch_cyc.step()
    with pytest.raises(ConfigError, match="warmup"):
        Cosine(steps=3, warmup=3)
    with pytest.raises(ConfigError, match="period"):
        Cyclical(period=1, low=0.0, high=1.0)


def _loop(model: nn.Module, hook: AdapterSchedule, optimizer: torch.optim.Optimizer, steps: range,
          ) -> list[tuple[float, float]]:
    """(scale, lr of group 0) seen by each optimizer step of ``steps``."""
    hooks = HookList([hook])
    hooks.on_train_begin(model, optimizer)
    seen = []
    for step in steps:
        hooks.before_forward(model, step)
        model(X).pow(2).mean().backward()
        hooks.before_step(model, optimizer, step)
        seen.append((next(hosts(model)).adapters["a"].multiplier, optimizer.param_groups[0]["lr"]))
        optimizer.step(), optimizer.zero_grad()
        hooks.after_step(model, optimizer, step + 1)
    return seen


def test_the_hook_sets_scale_and_lr_per_step_and_resumes_exactly() -> None:
    def run() -> tuple[nn.Module, AdapterSchedule, torch.optim.Optimizer]:
        model = _linear(lorakit.LoraConfig(r=2, targets=["layer"]))
        hook = AdapterSchedule(scale=Cyclical(period=4, low=0.5, high=1.0), lr=Cosine(steps=8, end=0.1), names="a")
        return model, hook, torch.optim.AdamW(lorakit.trainable_parameters(model).values(), lr=1e-2)

    model, hook, optimizer = run()
    whole = _loop(model, hook, optimizer, range(8))
    assert whole == [(pytest.approx(Cyclical(4, 0.5, 1.0)(t)), pytest.approx(1e-2 * Cosine(8, end=0.1)(t)))
                     for t in range(8)]
    model, hook, optimizer = run()
    _loop(model, hook, optimizer, range(5))
    state, optimizer_state = hook.state_dict(), optimizer.state_dict()  # group lr is now the schedule's, not 1e-2
    _, resumed, optimizer = run()
    resumed.load_state_dict(state, model)
    optimizer.load_state_dict(optimizer_state)
    assert _loop(model, resumed, optimizer, range(5, 8)) == whole[5:]
    with pytest.raises(LorakitError, match="same schedules"):
        AdapterSchedule(scale=Constant(0.5), names="a").load_state_dict(state, model)


class Blocks(nn.Module):
    """Three blocks of one Linear each, LoRA (random, so every adapter contributes) on each."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def _staged(earlier: str = "frozen") -> tuple[nn.Module, StagedLayers, torch.optim.Optimizer, list[dict]]:
    torch.manual_seed(0)
    model = lorakit.adapt(Blocks(), lorakit.LoraConfig(r=2, targets=r"layers\.\d\.0", init="random"))
    hook = StagedLayers([(0, range(0, 1)), (2, (1, 2)), (4, r"layers\.2\.0")], earlier=earlier)
    optimizer = torch.optim.AdamW(lorakit.trainable_parameters(model).values(), lr=1e-2, weight_decay=0.1)
    per_block = [{k: p for k, p in lorakit.trainable_parameters(model).items() if k.startswith(f"layers.{i}.")}
                 for i in range(3)]
    return model, hook, optimizer, per_block


def _changed(per_block: list[dict], before: list[dict]) -> list[int]:
    return [i for i, block in enumerate(per_block) if any(not torch.equal(p, before[i][k]) for k, p in block.items())]


@pytest.mark.parametrize("earlier", ["frozen", "trained"])
def test_staged_training_reaches_only_the_current_stage(earlier: str) -> None:
    model, hook, optimizer, per_block = _staged(earlier)
    x = torch.randn(5, 6)
    hooks = HookList([hook])
    hooks.on_train_begin(model, optimizer)
    for step in range(6):
        hooks.before_forward(model, step)
        before = [{k: p.detach().clone() for k, p in block.items()} for block in per_block]
        model(x).pow(2).sum().backward()
        optimizer.step(), optimizer.zero_grad()
        stage = hook.current(step)
        assert _changed(per_block, before) == (list(range(stage + 1)) if earlier == "trained" else [stage])
    host = next(hosts(model))  # block 0's layer: frozen since step 2, still in the forward
    assert host.path == "layers.0.0" and host.active == ("default",)
    out = model(x)
    host.active = ()
    assert not torch.allclose(model(x), out)


def test_staged_training_resumes_at_its_stage_and_refuses_bad_stages() -> None:
    model, hook, optimizer, per_block = _staged()
    hook.on_train_begin(model, optimizer)
    hook.before_forward(model, 3)
    _, resumed, optimizer, _ = _staged()
    resumed.load_state_dict(hook.state_dict(), model)
    resumed.on_train_begin(model, optimizer)
    assert [all(p.requires_grad for p in b.values()) for b in per_block] == [False, True, False]
    with pytest.raises(ConfigError, match="increase strictly from 0"):
        StagedLayers([(1, range(0, 1))])
    with pytest.raises(ConfigError, match="within the 3 blocks"):
        StagedLayers([(0, (2, 5))]).on_train_begin(model, optimizer)
    with pytest.raises(ConfigError, match="selects no layer"):
        StagedLayers([(0, r"nothing")]).on_train_begin(model, optimizer)
