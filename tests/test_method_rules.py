"""Catalogue methods' training-time rules reach any trainer through ``training_hooks``: S2-LoRA's L1 proximal step,
LaMDA's freezing of B, MoSA's module sampling and SaRA's nuclear-norm regulariser."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_finetune import adapter, lm_options

from lorakit.errors import ConfigError, LorakitError
from lorakit.inject import hosts
from lorakit.methods.lamda import LamdaFreeze
from lorakit.train.loop import StepResult, Trainer
from lorakit.train.run import finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def lambdas(run: Path) -> torch.Tensor:
    return torch.cat([t.flatten() for k, t in adapter(run).items() if "s2lora_lambda" in k])


def test_s2lora_l1_proximal_step_makes_coefficients_exactly_zero(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    finetune(lm_options(model_dir, texts, tmp_path / "plain", steps=3, method="s2lora"))
    finetune(lm_options(model_dir, texts, tmp_path / "l1", steps=3, method="s2lora", method_options={"l1": 1e3}))
    assert (lambdas(tmp_path / "plain") != 0).all()
    assert (lambdas(tmp_path / "l1") == 0).all()  # every step's change is within lr * l1 of zero


def test_lamda_stops_training_b_at_its_step_and_frees_its_state(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []

    def count(trainer: Trainer, result: StepResult) -> None:
        b = [h.adapters["default"].lora_B for h in hosts(trainer.model)]
        seen.append((len(trainer.params), sum(p in trainer.optimizer.state for p in b)))

    finetune(lm_options(model_dir, texts, tmp_path, steps=4, method="lamda", method_options={"freeze_b_step": 2},
                        rank=4), callbacks=[count])
    layers = seen[0][1]
    assert layers > 0 and seen[0] == (2 * layers, layers) and seen[1] == (layers, 0) and seen[3] == (layers, 0)
    with pytest.raises(LorakitError, match="after the freeze"):
        LamdaFreeze("default").load_state_dict({"frozen": 3}, torch.nn.Linear(1, 1))


@pytest.mark.parametrize("form,up", [("paper", "mosa_up"), ("parallel", "lora_B")])
def test_mosa_trains_only_the_sampled_modules_and_ends_complete(model_dir: Path, texts: Path, tmp_path: Path,
                                                                form: str, up: str) -> None:
    moved: list[torch.Tensor] = []

    def record(trainer: Trainer, result: StepResult) -> None:
        for host in hosts(trainer.model):
            mosa = host.adapters["default"]
            raw_b = next(p for n, p in mosa.named_parameters() if up in n)  # the up projection starts at zero
            if result.step == 2:  # step 1 ran at learning rate 0 (warmup); its moments move step 1's module too
                moved.append((raw_b != 0).float().mean())
            if result.step == 3:
                assert mosa._masks is None  # every module active after the last step

    finetune(lm_options(model_dir, texts, tmp_path, steps=3, method="mosa",
                        method_options={"modules": 4, "active_modules": 1, "form": form}), callbacks=[record])
    share = torch.stack(moved)
    assert ((share > 0.15) & (share < 0.6)).all()  # one or two modules of four moved, never all
    with pytest.raises(ConfigError, match="active_modules"):
        finetune(lm_options(model_dir, texts, tmp_path / "bad", method="mosa", method_options={"active_modules": 5}))


def nuclear(model_dir: Path, run: Path) -> float:
    """Sum over layers of the nuclear norm of the sparse update a saved SaRA run trained."""
    from transformers import AutoModelForCausalLM

    import lorakit

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.load_adapter(model, run)
    return sum(float(torch.linalg.matrix_norm(h.adapters["default"].delta_weight(h.backend), ord="nuc"))
               for h in hosts(model) if "default" in h.adapters)


def test_sara_nuclear_weight_adds_its_regulariser(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    """Through ``finetune``: the regularised run's sparse updates have the smaller nuclear norm (a wrong sign, or a
    regulariser never added, would not shrink it)."""
    finetune(lm_options(model_dir, texts, tmp_path / "plain", steps=3, method="sara", lr=0.05))
    finetune(lm_options(model_dir, texts, tmp_path / "nuc", steps=3, method="sara", lr=0.05,
                        method_options={"nuclear_weight": 1e3}))
    assert adapter(tmp_path / "plain").keys() == adapter(tmp_path / "nuc").keys()
    assert nuclear(model_dir, tmp_path / "nuc") < 0.9 * nuclear(model_dir, tmp_path / "plain")


# Two adapters of one method with different rule settings; before each adapter's hooks took its name, every hook
# acted on every adapter of its class (two S2-LoRA jobs shrank each other's lambdas twice, ...).
TWO_JOBS = {
    "sara": ({"nuclear_weight": 0.1}, {"nuclear_weight": 0.3}),
    "s2lora": ({"l1": 0.05}, {"l1": 0.2}),
    "lamda": ({"freeze_b_step": 1}, {"freeze_b_step": 3}),
    "mosa": ({"seed": 1, "active_modules": 2}, {"seed": 2, "active_modules": 1}),
}
SEEDS = {"a": 10, "b": 20}


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _two_job_model(method: str, names: list[str]) -> torch.nn.Module:
    import lorakit

    torch.manual_seed(0)
    model = MLP()
    for name in names:
        torch.manual_seed(SEEDS[name])
        config = lorakit.build_config(method, targets=["up", "down"], **TWO_JOBS[method][name == "b"])
        lorakit.adapt(model, config, name)
        with torch.no_grad():
            for p in lorakit.trainable_parameters(model, name).values():
                p.add_(0.1 * torch.randn_like(p))
    return model


def _train(method: str, rows: list[str | None], steps: int = 4) -> dict[str, torch.Tensor]:
    import lorakit
    from lorakit.hooks import HookList, training_hooks

    names = sorted({n for n in rows if n is not None})
    model = _two_job_model(method, names)
    model.train()
    hooks = HookList([h for n in names for h in training_hooks(lorakit.configs(model)[n], n, steps)])
    opt = torch.optim.Adam(list(lorakit.trainable_parameters(model).values()), lr=0.05)
    gen = torch.Generator().manual_seed(5)
    x_all, probe = torch.randn(steps, 4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    keep = [i for i, n in enumerate(rows) if n is not None]
    hooks.on_train_begin(model, opt)
    for step in range(steps):
        hooks.before_forward(model, step)
        with lorakit.route(model, [rows[i] for i in keep]):
            (model(x_all[step][keep]) * probe[keep]).sum().backward()
        extra = hooks.regulariser(model)
        if extra is not None:
            extra.backward()
        hooks.before_step(model, opt, step)
        opt.step()
        opt.zero_grad()
        hooks.after_step(model, opt, step + 1)
    return {k: p.detach().clone() for k, p in model.state_dict().items() if ".adapters." in k or "shared" in k}


@pytest.mark.parametrize("method", sorted(TWO_JOBS))
def test_two_jobs_of_one_method_train_in_one_model_exactly_as_each_alone(method: str) -> None:
    """Rows 0-1 train adapter a, rows 2-3 adapter b, each with its own rule settings and hooks."""
    together = _train(method, ["a", "a", "b", "b"])
    for name, rows in (("a", ["a", "a", None, None]), ("b", [None, None, "b", "b"])):
        alone = _train(method, rows)
        mine = {k: v for k, v in together.items() if f".{name}." in k or k.endswith(f".{name}")}
        assert mine and mine.keys() == alone.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], alone[key], atol=1e-6, rtol=1e-5, msg=f"{method}: {key}")
