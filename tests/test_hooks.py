"""Training hooks: call order in the Trainer, regularisers reach the gradient, optimizer-state surgery when a hook
prunes, grows or freezes tensors, and hook state surviving a checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_finetune import adapter, lm_options
from torch import nn

from lorakit.errors import ConfigError, LorakitError
from lorakit.hooks import HookList, TrainingHook, optimized_parameters, replace_parameter
from lorakit.optim import build_optimizer
from lorakit.train.loop import StepResult, Trainer
from lorakit.train.run import finetune

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(TrainingHook):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.calls.append(("begin", -1))

    def before_forward(self, model: nn.Module, step: int) -> None:
        self.calls.append(("forward", step))

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        assert all(p.grad is not None for p in optimized_parameters(optimizer))
        self.calls.append(("step", step))

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        assert all(p.grad is None for p in optimized_parameters(optimizer))
        self.calls.append(("after", step))


def test_trainer_calls_hooks_at_each_point_of_every_step(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    hook = Recorder()
    finetune(lm_options(model_dir, texts, tmp_path, steps=3), hooks=[hook])
    per_step = [c for s in range(3) for c in (("forward", s), ("step", s), ("after", s + 1))]
    assert hook.calls == [("begin", -1)] + per_step


class Shrink(TrainingHook):
    """L2 pull of every lora_A towards zero, as a regulariser."""

    def regulariser(self, model: nn.Module) -> torch.Tensor:
        return 50.0 * sum((p ** 2).sum() for n, p in model.named_parameters() if "lora_A" in n)


def test_a_regulariser_reaches_the_gradient(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    finetune(lm_options(model_dir, texts, tmp_path / "plain", steps=4, lr=0.05))
    finetune(lm_options(model_dir, texts, tmp_path / "shrunk", steps=4, lr=0.05), hooks=[Shrink()])
    norm = lambda run: sum(float(t.norm()) for k, t in adapter(run).items() if "lora_A" in k)
    assert norm(tmp_path / "shrunk") < 0.5 * norm(tmp_path / "plain")


class FreezeFirst(TrainingHook):
    """Stops training the first optimized tensor after step 2 (as LISA does to a layer)."""

    def __init__(self) -> None:
        self.frozen: nn.Parameter | None = None
        self.value: torch.Tensor | None = None

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if step == 2:
            self.frozen = optimized_parameters(optimizer)[0]
            replace_parameter(optimizer, self.frozen, None)
            self.frozen.requires_grad_(False)
            self.value = self.frozen.detach().clone()


def test_a_hook_can_freeze_a_tensor_and_its_optimizer_state_is_freed(model_dir: Path, texts: Path,
                                                                       tmp_path: Path) -> None:
    hook = FreezeFirst()
    seen: list[int] = []

    def count(trainer: Trainer, result: StepResult) -> None:
        seen.append(len(trainer.params))
        assert hook.frozen is None or hook.frozen not in trainer.optimizer.state

    finetune(lm_options(model_dir, texts, tmp_path, steps=4), callbacks=[count], hooks=[hook])
    assert seen[2] == seen[0] - 1 and torch.equal(hook.frozen, hook.value)


def test_replace_parameter_gathers_pruned_moments_and_zero_fills_grown_ones() -> None:
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4, 3))
    opt = build_optimizer("adamw", {"p": p}, lr=0.1)
    p.grad = torch.randn(4, 3)
    opt.step()
    moments = {k: v.clone() for k, v in opt.state[p].items()}
    keep = torch.tensor([0, 2])
    small = nn.Parameter(p.detach()[keep].clone())
    replace_parameter(opt, p, small, keep=keep)
    assert optimized_parameters(opt) == [small] and p not in opt.state
    assert torch.equal(opt.state[small]["exp_avg"], moments["exp_avg"][keep])
    assert torch.equal(opt.state[small]["step"], moments["step"])
    big = nn.Parameter(torch.zeros(2, 5))
    replace_parameter(opt, small, big, keep=torch.arange(3), dim=1)
    assert torch.equal(opt.state[big]["exp_avg_sq"][:, :3], moments["exp_avg_sq"][keep])
    assert not opt.state[big]["exp_avg_sq"][:, 3:].any()
    big.grad = torch.ones_like(big)
    opt.step()  # the optimizer runs on the new shapes
    with pytest.raises(LorakitError, match="does not update"):
        replace_parameter(opt, small, None)
    with pytest.raises(LorakitError, match="give `keep`"):
        replace_parameter(opt, big, nn.Parameter(torch.zeros(3, 5)))


class Counter(TrainingHook):
    def __init__(self) -> None:
        self.count = 0

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.count += 1

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        self.count = state["count"]


def test_hook_state_is_checkpointed_and_restored_on_resume(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    def interrupt(trainer: Trainer, result: StepResult) -> None:
        if result.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(lm_options(model_dir, texts, tmp_path, steps=5, save_every=3), callbacks=[interrupt],
                 hooks=[Counter()])
    resumed = Counter()
    finetune(lm_options(model_dir, texts, tmp_path, steps=5, save_every=3, resume=True), hooks=[resumed])
    assert resumed.count == 5
    with pytest.raises(LorakitError, match="training hooks"):
        HookList([Counter(), Counter()]).load_state_dict({"hooks": [{"count": 1}]}, nn.Linear(1, 1))


def test_bad_optimizer_names_and_options_are_refused() -> None:
    p = {"p": nn.Parameter(torch.zeros(2))}
    with pytest.raises(ConfigError, match="available: .*adamw"):
        build_optimizer("adamx", p, lr=1.0)
    with pytest.raises(ConfigError, match="no option"):
        build_optimizer("adamw", p, lr=1.0, momentum=0.9)
    with pytest.raises(LorakitError, match="TrainingHook"):
        HookList([object()])  # type: ignore[list-item]
