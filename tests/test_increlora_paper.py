"""IncreLoRA as its authors' code trains it: no growth during the initial warm-up, and advance learning (a reserve
component per layer whose factors train at a fixed ``λ = 1e-5`` outside the budget, promoted on growth, removed at
the budget), resumed exactly from checkpoints; without advance learning growth is what it was before."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_finetune import adapter, lm_options, step_losses
from test_rank import IDS, adapted, run
from torch import nn
from zoo import tiny_llama

import lorakit
from lorakit.errors import ConfigError
from lorakit.hooks import HookList, TrainingHook, training_hooks
from lorakit.inject import configs, hosts
from lorakit.methods.gated import GatedLora
from lorakit.rank import ranks_of, total_rank
from lorakit.rank.importance import ImportanceHook
from lorakit.rank.increlora import RESERVE_LAMBDA, IncreLoraHook
from lorakit.rank.ops import gated_layers, resize_ranks
from lorakit.train.loop import StepResult, Trainer
from lorakit.train.run import finetune

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 4  # q_proj and v_proj of the tiny Llama's two blocks
TINY = torch.tensor(RESERVE_LAMBDA)  # 1e-5 as the adapters' float32 holds it


def gated(model: nn.Module) -> dict[str, GatedLora]:
    return {h.path: h.adapters["default"] for h in hosts(model)}


def adamw(model: nn.Module, weight_decay: float = 0.0) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(lorakit.trainable_parameters(model).values()), lr=0.02, weight_decay=weight_decay)


def counted(hook: IncreLoraHook, model: nn.Module) -> int:
    return sum(hook.counted_ranks(model).values())


def without_reserves(model: nn.Module) -> torch.Tensor:
    """The logits with every layer's last component's ``λ`` (the reserve's) set to 0 (then put back)."""
    saved = {path: a.lora_E.detach().clone() for path, a in gated(model).items()}
    with torch.no_grad():
        for a in gated(model).values():
            a.lora_E[-1] = 0.0
        out = model(IDS).logits.detach()
        for path, a in gated(model).items():
            a.lora_E.copy_(saved[path])
    return out


# (a) ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("advance", [True, False])
def test_no_rank_is_added_at_or_before_init_warmup_and_growth_follows_it(advance: bool) -> None:
    """The config reaches the hook through the training rule; growth every 2 steps would come at steps 2 and 4 but
    ``init_warmup=4`` holds it back until step 6 (``>``, not ``>=``: step 4 is still warm-up)."""
    model = adapted("increlora", r=1, target_r=3, grow_every=2, init_warmup=4, advance_learning=advance)
    (hook,) = training_hooks(configs(model)["default"], "default", 10)
    assert isinstance(hook, IncreLoraHook) and (hook.init_warmup, hook.advance_learning) == (4, advance)
    totals: list[int] = []
    run(model, HookList([hook]), adamw(model), steps=10, each=lambda s: totals.append(counted(hook, model)))
    assert totals == [4, 4, 4, 4, 4, 5, 5, 6, 6, 7]
    assert hook.metrics()["increlora/default/rank"] == 7
    assert hook.metrics()["increlora/default/reserve"] == (LAYERS if advance else 0)


def test_init_warmup_and_advance_learning_are_validated() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="init_warmup"):
            lorakit.build_config("increlora", init_warmup=bad)
    with pytest.raises(ConfigError, match="advance_learning"):
        lorakit.build_config("increlora", advance_learning="yes")
    with pytest.raises(ConfigError, match="init_warmup"):
        IncreLoraHook(budget=8, init_warmup=-1)


# (b) ---------------------------------------------------------------------------------------------------------------
def test_reserves_learn_their_factors_in_advance_at_a_fixed_tiny_lambda() -> None:
    """Each layer gets one reserve at the start. Its gradient on ``λ`` is zero already when clipping would read it,
    AdamW's moments of it stay zero, weight decay does not shrink it, and its ``P, Q`` train; it changes the
    output by less than 1e-4 of what the counted components do."""
    model = adapted("increlora", r=2)
    base = model(IDS).logits.detach()  # Λ = 0 at init: the base model's output
    opt = adamw(model, weight_decay=0.1)
    hook = IncreLoraHook(budget=12, grow_every=100)
    seen: list[torch.Tensor] = []

    class Grads(TrainingHook):  # the reserve's λ gradient where clipping and the optimizer see it
        def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
            seen.extend(a.lora_E.grad[-1] for a in gated(model).values())

    hooks = HookList([hook, Grads()])
    hooks.on_train_begin(model, opt)
    assert ranks_of(model, "default") == {p: 3 for p in gated(model)} and counted(hook, model) == 8
    start = {p: (a.lora_A[-1].detach().clone(), a.lora_B[:, -1].detach().clone()) for p, a in gated(model).items()}
    assert 0 < float((model(IDS).logits.detach() - base).abs().max()) < 1e-5
    run(model, hooks, opt, steps=6)
    assert len(seen) == 6 * LAYERS and all(float(g) == 0.0 for g in seen)
    for path, a in gated(model).items():
        assert torch.equal(a.lora_E[-1].detach(), TINY)  # exactly 1e-5 after 6 AdamW steps with weight decay
        assert not opt.state[a.lora_E]["exp_avg"][-1].any() and not opt.state[a.lora_E]["exp_avg_sq"][-1].any()
        assert a.lora_E[:2].abs().min() > 1e-3  # the counted λ trained
        a0, b0 = start[path]
        assert (a.lora_A[-1] - a0).abs().max() > 1e-2 and (a.lora_B[:, -1] - b0).abs().max() > 1e-2
    out = model(IDS).logits.detach()
    reserve_part = float((out - without_reserves(model)).abs().max())
    assert 0 < reserve_part < 1e-4 * float((out - base).abs().max())


# (c) ---------------------------------------------------------------------------------------------------------------
def test_growth_promotes_the_reserve_with_its_learned_factors_and_appends_a_fresh_one(tmp_path: Path) -> None:
    """At step 3 one layer grows: its reserve counts from then on with the factors and moments it learned (not
    re-initialised), its λ trains from 1e-5; a fresh reserve follows it. A file saved then loads to the same output."""
    model = adapted("increlora", r=1)
    opt = adamw(model)
    before: dict[str, dict[str, Any]] = {}

    class Record(IncreLoraHook):
        def grow(self, model, optimizer=None):
            for path, a in gated(model).items():
                before[path] = {n: getattr(a, n).detach().clone() for n in GatedLora.RANK_DIMS}
                before[path]["exp_avg_A"] = optimizer.state[a.lora_A]["exp_avg"].clone()
            return super().grow(model, optimizer)

    hook = Record(budget=8, grow_every=3, grow_layers=1)
    run(model, HookList([hook]), opt, steps=3)
    (grown,) = [p for p, r in ranks_of(model, "default").items() if r == 3]
    for path, a in gated(model).items():
        old = before[path]
        if path != grown:
            assert a.r == 2 and all(torch.equal(getattr(a, n), old[n]) for n in GatedLora.RANK_DIMS)
            continue
        assert torch.equal(a.lora_A[:2], old["lora_A"]) and torch.equal(a.lora_B[:, :2], old["lora_B"])
        assert torch.equal(a.lora_E[:2], old["lora_E"]) and torch.equal(a.lora_E[1], TINY)  # promoted, not reset
        assert torch.equal(opt.state[a.lora_A]["exp_avg"][:2], old["exp_avg_A"])  # learned moments kept
        assert old["exp_avg_A"][1].abs().min() > 0  # ... and they were learned while it was a reserve
        assert torch.equal(a.lora_E[2], TINY) and not opt.state[a.lora_A]["exp_avg"][2].any()  # fresh reserve
        fresh_a = a.lora_A[2].detach().clone()
    assert counted(hook, model) == 5 and total_rank(model, "default") == 5 + LAYERS

    mid = model(IDS).logits.detach()  # a file saved mid-training, reserves included, loads and gives this output
    lorakit.save_adapter(model, tmp_path)
    fresh = tiny_llama(0)
    lorakit.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(IDS).logits, mid) and ranks_of(fresh, "default") == ranks_of(model, "default")

    run(model, HookList([hook]), opt, steps=1, start=3)
    a = gated(model)[grown]
    assert not torch.equal(a.lora_E[1], TINY) and torch.equal(a.lora_E[2], TINY)  # the promoted λ trains now
    assert not torch.equal(a.lora_A[2], fresh_a)  # the new reserve's factors learn in advance


# (d) ---------------------------------------------------------------------------------------------------------------
def test_reserves_never_count_against_the_budget() -> None:
    """Budget 7 from 4 counted ranks: with the 4 reserves the tensors hold 8 ranks at the start and 10 after the
    first growth, yet growth goes on to exactly 7 counted and never beyond."""
    model = adapted("increlora", r=1)
    hook = IncreLoraHook(budget=7, grow_every=1, grow_layers=2)
    seen: list[tuple[int, int]] = []
    run(model, HookList([hook]), adamw(model), steps=4,
        each=lambda s: seen.append((counted(hook, model), total_rank(model, "default"))))
    assert seen[0] == (6, 6 + LAYERS) and all(c <= 7 for c, _ in seen) and seen[1][0] == 7


def test_a_layers_score_leaves_its_reserve_out() -> None:
    """The first layer's counted component scores 1, the second's 0.5 with a reserve scoring 100: the first grows
    (a mean over all components would pick the second)."""
    model = adapted("increlora", r=1)
    hook = IncreLoraHook(budget=8, grow_layers=1)
    hook.on_train_begin(model, adamw(model))
    scores = [(1.0, 0.0), (0.5, 100.0), (0.1, 0.0), (0.1, 0.0)]  # (counted, reserve) per layer
    hook.importance.ema = {f"{path}|lora_E": (torch.tensor(s).sqrt(), torch.tensor(s).sqrt())  # s = Ī ⊙ Ū
                           for path, s in zip(gated(model), scores)}
    assert hook.grow(model) == [next(iter(gated(model)))]


# (e) ---------------------------------------------------------------------------------------------------------------
def test_reaching_the_budget_removes_the_reserves_and_their_contribution() -> None:
    """The authors set the remaining reserves' λ to 0 at the target; lorakit removes those components (tensors,
    moments, importance rows), which is the same update ``ΔW`` and leaves an adapter of exactly the budget."""
    model = adapted("increlora", r=1)
    opt = adamw(model)
    before: dict[str, dict[str, torch.Tensor]] = {}
    expected: list[torch.Tensor] = []

    class Last(IncreLoraHook):
        def grow(self, model, optimizer=None):
            before.update({p: {n: getattr(a, n).detach().clone() for n in GatedLora.RANK_DIMS}
                           for p, a in gated(model).items()})
            expected.append(without_reserves(model))  # every reserve's λ at 0, the ones about to count included
            return super().grow(model, optimizer)

    hook = Last(budget=6, grow_every=2, grow_layers=2)
    run(model, HookList([hook]), opt, steps=2)
    assert hook.reserve == 0 and ranks_of(model, "default") == hook.counted_ranks(model)
    assert total_rank(model, "default") == 6 == sum(configs(model)["default"].rank_of(p) for p in gated(model))
    for path, a in gated(model).items():  # the components kept are the old ones, untouched: only reserves went
        old = before[path]
        assert torch.equal(a.lora_A, old["lora_A"][:a.r]) and torch.equal(a.lora_B, old["lora_B"][:, :a.r])
        assert torch.equal(a.lora_E, old["lora_E"][:a.r])
        assert all(opt.state[getattr(a, n)]["exp_avg"].shape == getattr(a, n).shape for n in GatedLora.RANK_DIMS)
        assert hook.importance.scores(path, a).shape == (a.r,)
    promoted = [a for a in gated(model).values() if a.r == 2]
    assert len(promoted) == 2 and all(torch.equal(a.lora_E[1], TINY) for a in promoted)
    out = model(IDS).logits.detach()
    assert float((out - expected[0]).abs().max()) < 1e-5  # only the two promoted components' λ = 1e-5 differ
    run(model, HookList([hook]), opt, steps=2, start=2)  # training goes on: no reserve comes back, every λ trains
    assert hook.reserve == 0 and total_rank(model, "default") == 6
    assert not any(torch.equal(a.lora_E[1], TINY) for a in promoted)


# (f) ---------------------------------------------------------------------------------------------------------------
def test_resume_mid_training_with_reserves_equals_the_uninterrupted_run(model_dir: Path, texts: Path,
                                                                       tmp_path: Path) -> None:
    """Growth at steps 2, 4, 6 and 8 (after a warm-up of 1), the budget (3 per layer) reached at step 8; the run is
    stopped after step 5, when every layer holds a reserve, and resumed: losses and adapter match bit for bit."""
    opts = dict(method="increlora", rank=2, steps=8, save_every=3, lr=0.05, targets="q_proj,v_proj",
                method_options={"target_r": 3, "grow_every": 2, "init_warmup": 1})
    finetune(lm_options(model_dir, texts, tmp_path / "straight", **opts))

    def interrupt(trainer: Trainer, result: StepResult) -> None:
        if result.step == 5:
            raise KeyboardInterrupt

    run_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        finetune(lm_options(model_dir, texts, run_dir, **opts), callbacks=[interrupt])
    held = torch.load(run_dir / "checkpoint-5" / "trainer.pt", weights_only=True)["hooks"]["hooks"][0]
    saved = json.loads((run_dir / "checkpoint-5" / "adapter_config.json").read_text())
    assert held["reserve"] == 1 and sum(saved["rank_pattern"].values()) == 2 * LAYERS + 2 + LAYERS
    finetune(lm_options(model_dir, texts, run_dir, resume=True, **opts))
    assert step_losses(run_dir) == step_losses(tmp_path / "straight")
    final = adapter(tmp_path / "straight")
    assert adapter(run_dir).keys() == final.keys()
    for key, value in final.items():
        assert torch.equal(adapter(run_dir)[key], value), key
    ranks = json.loads((run_dir / "adapter_config.json").read_text())["rank_pattern"]
    assert sum(ranks.values()) == 3 * LAYERS  # the budget, reserves removed


# (g) ---------------------------------------------------------------------------------------------------------------
class GrowthBefore(ImportanceHook):
    """lorakit's IncreLoRA growth before the warm-up and advance learning existed (the reference for (g))."""

    def __init__(self, budget: int, grow_every: int, grow_layers: int) -> None:
        super().__init__("default", 0.85, 0.85, 0.5)
        self.budget, self.grow_every, self.grow_layers = budget, grow_every, grow_layers

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if step % self.grow_every:
            return
        room = self.budget - total_rank(model, self.name)
        layers = gated_layers(model, self.name)
        if room <= 0:
            return
        score = torch.stack([self.importance.scores(h.path, a).mean() for h, a in layers])
        for i in torch.topk(score, min(self.grow_layers, room, len(layers))).indices.tolist():
            host, a = layers[i]
            keep = torch.arange(a.r)
            resize_ranks(model, self.name, host, keep, extra=1, optimizer=optimizer)
            self.importance.resize(host.path, keep, 1)


def test_without_advance_learning_growth_is_what_it_was() -> None:
    def train(hook: TrainingHook) -> tuple[dict[str, torch.Tensor], list[dict[str, int]]]:
        model = adapted("increlora", r=1, seed=3)
        torch.manual_seed(7)  # new components draw their factors
        ranks: list[dict[str, int]] = []
        run(model, HookList([hook]), adamw(model), steps=9, each=lambda s: ranks.append(ranks_of(model, "default")))
        return {k: v.detach().clone() for k, v in lorakit.trainable_parameters(model).items()}, ranks

    now, now_ranks = train(IncreLoraHook(budget=9, grow_every=2, grow_layers=2, advance_learning=False))
    then, then_ranks = train(GrowthBefore(budget=9, grow_every=2, grow_layers=2))
    assert now_ranks == then_ranks and sum(now_ranks[-1].values()) == 9
    assert now.keys() == then.keys() and all(torch.equal(now[k], then[k]) for k in now)
