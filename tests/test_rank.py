"""Rank allocation: SoRA's proximal gates and pruning, DyLoRA's nested ranks, IncreLoRA's growth and AdaLoRA's budget
(with the optimizer's moments carried through every resize), Flexora's layer selection, CoLoRA's allocation, and
adapters whose ranks differ per layer saving, loading and opening in PEFT."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_finetune import lm_options
from torch import nn
from zoo import tiny_llama

import lorakit
from lorakit.errors import ConfigError, LorakitError
from lorakit.hooks import HookList, TrainingHook
from lorakit.inject import configs, hosts
from lorakit.io.export import export_lora
from lorakit.rank import ranks_of, total_rank
from lorakit.rank.adalora import AdaLoraHook
from lorakit.rank.colora import allocate_ranks, allocated_config, contributions
from lorakit.rank.flexora import FlexoraHook
from lorakit.rank.importance import orthogonality
from lorakit.rank.increlora import IncreLoraHook
from lorakit.rank.sora import SoraHook, soft_threshold
from lorakit.train.loop import StepResult, Trainer
from lorakit.train.run import finetune

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj"]  # 4 layers on the tiny Llama
IDS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))


def loss_of(model: nn.Module) -> torch.Tensor:
    return model(IDS, labels=IDS).loss


def adapted(method: str, seed: int = 0, **fields) -> nn.Module:
    model = tiny_llama(seed)
    torch.manual_seed(seed)
    lorakit.adapt(model, lorakit.build_config(method, targets=TARGETS, **fields))
    return model


def optimizer_of(model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(lorakit.trainable_parameters(model).values()), lr=lr, weight_decay=0.0)


def run(model: nn.Module, hooks: TrainingHook, optimizer: torch.optim.Optimizer, steps: int, start: int = 0,
        each=None) -> None:
    """The trainer's call order (see lorakit.hooks), in a plain loop."""
    hooks.on_train_begin(model, optimizer)
    for step in range(start, start + steps):
        hooks.before_forward(model, step)
        loss_of(model).backward()
        extra = hooks.regulariser(model)
        if extra is not None:
            extra.backward()
        hooks.before_step(model, optimizer, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hooks.after_step(model, optimizer, step + 1)
        if each is not None:
            each(step + 1)


def gates(model: nn.Module) -> dict[str, torch.Tensor]:
    return {h.path: h.adapters["default"].lora_E for h in hosts(model)}


def perturbed(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in lorakit.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.2)
    return model


# -- SoRA ------------------------------------------------------------------------------------------------------
def test_soft_threshold_is_the_l1_proximal_operator() -> None:
    z = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.3])
    out = soft_threshold(z, 0.1)
    torch.testing.assert_close(out, torch.tensor([-0.4, 0.0, 0.0, 0.0, 0.2]))
    assert (out[1:4] == 0).all()  # exact zeros, not small numbers


def test_sora_gate_step_is_proximal_and_reaches_exact_zeros() -> None:
    model = adapted("sora", r=6)
    opt = optimizer_of(model, lr=0.05)
    hook = SoraHook(sparse_lambda=8.0)
    hooks = HookList([hook])
    hooks.on_train_begin(model, opt)
    for step in range(3):
        loss_of(model).backward()
        hooks.before_step(model, opt, step)
        opt.step()
        z = {k: g.detach().clone() for k, g in gates(model).items()}  # after the gradient step, before prox
        opt.zero_grad(set_to_none=True)
        hooks.after_step(model, opt, step + 1)
        for key, g in gates(model).items():  # g = sign(z) max(|z| - eta * lambda, 0)
            expected = torch.sign(z[key]) * torch.clamp(z[key].abs() - 0.05 * 8.0, min=0)
            torch.testing.assert_close(g.detach(), expected, atol=0, rtol=0)
    assert any(bool((g == 0).any()) for g in gates(model).values())


def test_sora_with_unit_gates_is_lora() -> None:
    sora, lora = adapted("sora", r=4, alpha=8.0), adapted("lora", r=4, alpha=8.0)
    for hs, hl in zip(hosts(sora), hosts(lora)):
        with torch.no_grad():
            b = torch.randn_like(hs.adapters["default"].lora_B)
            hs.adapters["default"].lora_B.copy_(b)
            hl.adapters["default"].lora_B.weight.copy_(b)
        assert torch.equal(hs.adapters["default"].lora_A, hl.adapters["default"].lora_A.weight)
    torch.testing.assert_close(sora(IDS).logits, lora(IDS).logits, atol=1e-6, rtol=1e-6)


def test_sora_sparsity_schedule_rises_monotonically() -> None:
    hook = SoraHook(sparse_lambda=0.1, lambda_max=1.0, lambda_steps=10)
    values = [hook.lam(t) for t in range(15)]
    assert values[0] == 0.1 and values[10] == values[14] == 1.0
    assert all(a <= b for a, b in zip(values, values[1:]))
    with pytest.raises(ConfigError, match="lambda_max"):
        SoraHook(sparse_lambda=1.0, lambda_max=0.5)


def prune_ready_sora(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, SoraHook]:
    """SoRA trained 2 steps (Adam moments present), with some gates zeroed unevenly across layers."""
    model = adapted("sora", seed=seed, r=6)
    opt = optimizer_of(model)
    hook = SoraHook(sparse_lambda=0.0)
    run(model, HookList([hook]), opt, steps=2)
    with torch.no_grad():
        for i, g in enumerate(gates(model).values()):
            g[: i + 1] = 0.0  # layer i keeps 5 - i ranks (the last layer keeps 2)
    return model, opt, hook


def test_sora_pruning_keeps_the_function_and_carries_the_moments() -> None:
    model, opt, hook = prune_ready_sora()
    before_out = model(IDS).logits.detach()
    before = {}
    for h in hosts(model):
        a = h.adapters["default"]
        before[h.path] = {n: {k: v.clone() for k, v in opt.state[getattr(a, n)].items()} for n in ("lora_A", "lora_B")}
    ranks = hook.prune(model, opt)
    assert list(ranks.values()) == [5, 4, 3, 2]
    torch.testing.assert_close(model(IDS).logits, before_out, atol=1e-6, rtol=1e-6)
    for i, h in enumerate(hosts(model)):
        a, keep = h.adapters["default"], torch.arange(i + 1, 6)
        for n, dim in (("lora_A", 0), ("lora_B", 1)):
            p = getattr(a, n)
            state = opt.state[p]
            assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
            torch.testing.assert_close(state["exp_avg"], before[h.path][n]["exp_avg"].index_select(dim, keep))
            torch.testing.assert_close(state["exp_avg_sq"], before[h.path][n]["exp_avg_sq"].index_select(dim, keep))
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == sum(
        p.numel() for p in lorakit.trainable_parameters(model).values())
    run(model, HookList([hook]), opt, steps=1, start=2)  # training goes on with the new shapes
    assert configs(model)["default"].rank_of("model.layers.1.self_attn.v_proj") == 2


def test_pruned_ranks_save_load_and_open_in_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    model, opt, hook = prune_ready_sora()
    hook.prune(model, opt)
    out = model(IDS).logits.detach()
    lorakit.save_adapter(model, tmp_path / "own")
    fresh = tiny_llama(0)
    lorakit.load_adapter(fresh, tmp_path / "own")
    assert torch.equal(fresh(IDS).logits, out)
    assert ranks_of(fresh, "default") == ranks_of(model, "default")

    export_lora(model, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(saved["rank_pattern"].values()) == [2, 3, 4, 5] and saved["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "peft").eval()
    ranks = {n: m.r["default"] for n, m in peft_model.named_modules() if isinstance(getattr(m, "r", None), dict)}
    assert sorted(ranks.values()) == [2, 3, 4, 5]
    torch.testing.assert_close(peft_model(IDS).logits, out, atol=1e-5, rtol=1e-5)
    back = tiny_llama(0)
    lorakit.load_adapter(back, tmp_path / "peft")  # lorakit reads PEFT's rank_pattern too
    torch.testing.assert_close(back(IDS).logits, out, atol=1e-5, rtol=1e-5)


def test_a_layer_pruned_to_rank_zero_adds_nothing_and_still_saves(tmp_path: Path) -> None:
    from peft import PeftModel

    model, opt, hook = prune_ready_sora()
    with torch.no_grad():
        next(iter(gates(model).values())).zero_()
    before = model(IDS).logits.detach()
    hook.prune(model, opt)
    assert 0 in ranks_of(model, "default").values()
    out = model(IDS).logits.detach()
    torch.testing.assert_close(out, before, atol=1e-6, rtol=1e-6)
    lorakit.save_adapter(model, tmp_path / "own")
    fresh = tiny_llama(0)
    lorakit.load_adapter(fresh, tmp_path / "own")
    assert torch.equal(fresh(IDS).logits, out)
    export_lora(model, tmp_path / "peft")  # the rank-0 layer is left out of the PEFT file
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert len(saved["rank_pattern"]) == 3 and 0 not in saved["rank_pattern"].values()
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "peft").eval()
    torch.testing.assert_close(peft_model(IDS).logits, out, atol=1e-5, rtol=1e-5)


def test_finetune_gets_the_methods_hooks_and_resumes_with_pruned_ranks(model_dir: Path, texts: Path,
                                                                      tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def interrupt(trainer: Trainer, result: StepResult) -> None:
        seen.append([type(h).__name__ for h in trainer.hooks.hooks])
        if result.step == 3:
            raise KeyboardInterrupt

    opts = dict(method="sora", rank=4, alpha=8.0, steps=5, save_every=3, lr=0.05, targets="q_proj,v_proj")
    pruned_layer = "model.layers.0.self_attn.q_proj"

    class ZeroGates(TrainingHook):  # zero two gates of one layer at step 2 and prune them there
        def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
            if step == 2:
                sora = next(h for h in hosts(model) if h.path == pruned_layer).adapters["default"]
                with torch.no_grad():
                    sora.lora_E[:2] = 0.0
                SoraHook().prune(model, optimizer)

    with pytest.raises(KeyboardInterrupt):
        finetune(lm_options(model_dir, texts, tmp_path, **opts), callbacks=[interrupt], hooks=[ZeroGates()])
    assert seen[0] == ["SoraHook", "ZeroGates"]
    result = finetune(lm_options(model_dir, texts, tmp_path, resume=True, **opts), hooks=[ZeroGates()])
    saved = json.loads((Path(result["output"]) / "adapter_config.json").read_text())
    assert saved["lorakit_method"] == "sora" and saved["rank_pattern"][pruned_layer.replace(".", "\\.")] == 2


# -- IncreLoRA / AdaLoRA ---------------------------------------------------------------------------------------
def test_increlora_grows_within_budget_without_changing_the_output_and_keeps_moments() -> None:
    model = adapted("increlora", r=1)
    opt = optimizer_of(model, lr=0.02)
    totals: list[int] = []
    outputs_equal = []

    class Grow(IncreLoraHook):  # records the output right before and after each growth
        def grow(self, model, optimizer=None):
            before = model(IDS).logits.detach()
            moments = {h.path: optimizer.state[h.adapters["default"].lora_A]["exp_avg"].clone() for h in hosts(model)}
            grown = super().grow(model, optimizer)
            outputs_equal.append(torch.allclose(model(IDS).logits, before, atol=1e-6, rtol=1e-6))
            for h in hosts(model):
                new = optimizer.state[h.adapters["default"].lora_A]["exp_avg"]
                old = moments[h.path]
                assert torch.equal(new[: old.shape[0]], old) and not new[old.shape[0]:].any()
            return grown

    hook = Grow(budget=9, grow_every=2, grow_layers=2, advance_learning=False)  # advance: test_increlora_paper
    run(model, HookList([hook]), opt, steps=8, each=lambda s: totals.append(total_rank(model, "default")))
    assert all(t <= 9 for t in totals) and totals[-1] == 9 and totals[0] == 4
    assert outputs_equal and all(outputs_equal)
    assert sum(configs(model)["default"].rank_of(h.path) for h in hosts(model)) == 9


def test_adalora_masks_to_the_scheduled_budget_at_every_step_and_prunes_at_the_end() -> None:
    model = adapted("adalora", r=4)
    opt = optimizer_of(model, lr=0.02)
    hook = AdaLoraHook(total_steps=10, target_rank=1, per_layer=True, t_init=2, t_final=2, delta_t=2)
    seen = []

    def count(step: int) -> None:
        live = sum(int((g != 0).sum()) for g in gates(model).values())
        seen.append((step, hook.budget(step), live))

    run(model, HookList([hook]), opt, steps=10, each=count)
    budgets = [b for _, b, _ in seen]
    assert budgets[0] == 16 and budgets[-1] == 4 and all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert all(live <= budget for _, budget, live in seen)
    assert total_rank(model, "default") <= 4  # pruned for good at step 10
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in lorakit.trainable_parameters(model).values())


def test_orthogonality_regulariser_is_zero_for_orthonormal_factors_and_positive_otherwise() -> None:
    model = adapted("adalora", r=4)
    with torch.no_grad():
        for h in hosts(model):
            a = h.adapters["default"]
            q = torch.linalg.qr(torch.randn(a.lora_A.shape[1], 4))[0]  # (d_in, 4) orthonormal columns
            p = torch.linalg.qr(torch.randn(a.lora_B.shape[0], 4))[0]
            a.lora_A.copy_(q.t())
            a.lora_B.copy_(p)
    assert float(orthogonality(model, "default").detach()) < 1e-5
    a = next(iter(hosts(model))).adapters["default"]
    with torch.no_grad():
        a.lora_A[0] *= 2.0  # ||Q Q^T - I||_F = 3 on this layer, mean over 8 matrices
    torch.testing.assert_close(orthogonality(model, "default"), torch.tensor(3.0 / 8), atol=1e-5, rtol=1e-5)


def test_rank_hooks_refuse_bad_settings() -> None:
    with pytest.raises(ConfigError, match="t_init"):
        AdaLoraHook(total_steps=4, target_rank=1, t_init=2, t_final=2)
    with pytest.raises(ConfigError, match="budget"):
        IncreLoraHook(budget=0)
    model = adapted("increlora", r=2)
    with pytest.raises(ConfigError, match="budget"):
        run(model, HookList([IncreLoraHook(budget=3)]), optimizer_of(model), steps=1)
    with pytest.raises(ConfigError, match="target_r"):
        lorakit.build_config("increlora", r=4, target_r=2)
    with pytest.raises(ConfigError, match="rank_pattern"):
        lorakit.build_config("sora", rank_pattern={"q_proj": -1})
    with pytest.raises(LorakitError, match="no gated"):
        SoraHook().prune(adapted("lora"))


# -- Flexora / CoLoRA ------------------------------------------------------------------------------------------
def test_flexora_starts_as_lora_and_keeps_adapters_only_in_the_selected_layers() -> None:
    model = perturbed(adapted("lora", r=2))
    plain = model(IDS).logits.detach()
    opt = optimizer_of(model, lr=0.01)
    hook = FlexoraHook(loss_of, search_steps=3, keep=1, alpha_lr=0.1)
    hook.on_train_begin(model, opt)
    torch.testing.assert_close(model(IDS).logits, plain, atol=0, rtol=0)  # all alpha = 1: LoRA
    run(model, HookList([hook]), opt, steps=4)
    assert hook.selected is not None and len(hook.selected) == 1
    layer = hook.selected[0]
    left = {h.path for h in hosts(model) if "default" in h.adapters}
    assert left and all(p.startswith(layer + ".") for p in left)
    trained = {id(p) for p in opt.param_groups[0]["params"]}
    assert trained == {id(p) for p in lorakit.trainable_parameters(model).values()}
    assert all(not h.adapters or h.path.startswith(layer + ".") for h in hosts(model))


def test_flexora_scales_learn_through_the_fused_lora_path() -> None:
    """The scales weigh the adapter inside each layer's forward: one search step moves every one of them (they
    stayed exactly 1.0 when they were hooks around adapter modules that the fused kernel bypasses)."""
    model = perturbed(adapted("lora", r=2))
    opt = optimizer_of(model, lr=0.01)
    hook = FlexoraHook(loss_of, search_steps=5, keep=1, alpha_lr=0.1)
    run(model, HookList([hook]), opt, steps=1)
    assert hook.alphas and all(float(a) != 1.0 for a in hook.alphas.values())


class Parallel(nn.Module):
    """Four blocks, each reading its own slice of the input: ``y = sum_l blocks[l].lin(x[:, l])``."""

    def __init__(self, blocks: int = 4, d: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"lin": nn.Linear(d, d, bias=False)}) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(block["lin"](x[:, i]) for i, block in enumerate(self.blocks))


def test_flexora_selects_the_block_the_task_needs() -> None:
    torch.manual_seed(0)
    model = Parallel()
    g = torch.Generator().manual_seed(1)
    shift = torch.randn(8, 2, generator=g) @ torch.randn(2, 8, generator=g)  # what only block 2 can learn
    x_train, x_val = torch.randn(64, 4, 8, generator=g), torch.randn(64, 4, 8, generator=g)
    with torch.no_grad():
        y_train, y_val = model(x_train) + x_train[:, 2] @ shift.T, model(x_val) + x_val[:, 2] @ shift.T
    lorakit.adapt(model, lorakit.LoraConfig(r=2, targets=["lin"]))
    opt = torch.optim.AdamW(list(lorakit.trainable_parameters(model).values()), lr=0.05, weight_decay=0.0)
    hook = FlexoraHook(lambda m: (m(x_val) - y_val).pow(2).mean(), search_steps=30, keep=1, alpha_lr=0.05)
    hooks = HookList([hook])
    hooks.on_train_begin(model, opt)
    for step in range(30):
        (model(x_train) - y_train).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        hooks.after_step(model, opt, step + 1)
    assert hook.selected == ["blocks.2"]
    assert {h.path for h in hosts(model) if "default" in h.adapters} == {"blocks.2.lin"}


def test_colora_allocates_the_budget_by_contribution_and_drops_zero_layers() -> None:
    ranks = allocate_ranks({"a": 3.0, "b": 1.0, "c": 0.0, "d": 4.0}, budget=16)
    assert ranks == {"a": 6, "b": 2, "c": 0, "d": 8}
    capped = allocate_ranks({"a": 10.0, "b": 1.0, "c": 1.0}, budget=9, r_max=4)
    assert capped == {"a": 4, "b": 3, "c": 2} or capped == {"a": 4, "b": 2, "c": 3}
    assert sum(allocate_ranks({"x": 0.3, "y": 0.3, "z": 0.4}, budget=7).values()) == 7
    model = perturbed(adapted("lora", r=2))
    scores = contributions(model)
    scores[next(iter(scores))] = 0.0
    config = allocated_config(lorakit.LoraConfig(r=2), allocate_ranks(scores, budget=9))
    fresh = tiny_llama(0)
    lorakit.adapt(fresh, config)
    built = {h.path: h.adapters["default"].a.shape[0] for h in hosts(fresh)}
    assert next(iter(scores)) not in built and sum(built.values()) == 9


def test_finetune_passes_method_options_to_the_config_and_refuses_unknown_ones() -> None:
    from lorakit.train.errors import DataError
    from lorakit.train.run import Options, adapter_config

    config = adapter_config(Options(method="sora", rank=4, method_options={"sparse_lambda": 0.5, "prune_every": 3}))
    assert (config.sparse_lambda, config.prune_every, config.r) == (0.5, 3, 4)
    with pytest.raises(DataError, match="no option.*sparse_lambdaa"):
        adapter_config(Options(method="sora", method_options={"sparse_lambdaa": 0.5}))


def test_colora_config_for_many_layers_builds_each_at_its_rank() -> None:
    """SmolLM2 has 210 adapted layers: one regex of all their paths outgrew the pattern length limit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=12,
                                         num_attention_heads=2, num_key_value_heads=2))
    paths = [t.path for t in lorakit.inspect_targets(model, lorakit.LoraConfig(r=2))]
    assert len(paths) == 84
    ranks = {p: 1 + i % 3 for i, p in enumerate(paths)}
    lorakit.adapt(model, allocated_config(lorakit.LoraConfig(r=2), ranks))
    assert {h.path: h.adapters["default"].a.shape[0] for h in hosts(model)} == ranks
