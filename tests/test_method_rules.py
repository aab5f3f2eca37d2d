"""Catalogue methods' training-time rules reach any trainer through ``training_hooks``: S2-LoRA's L1 proximal step,
LaMDA's freezing of B, MoSA's module sampling and SaRA's nuclear-norm regulariser."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cli import one_thread  # noqa: F401  (autouse fixture)
from test_finetune import adapter, lm_options

from lorakit.errors import ConfigError, LorakitError
from lorakit.inject import hosts
from lorakit.methods.lamda import LamdaFreeze
from lorakit.train.loop import StepResult, Trainer
from lorakit.train.run import finetune


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


def test_mosa_trains_only_the_sampled_modules_and_ends_complete(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    moved: list[torch.Tensor] = []

    def record(trainer: Trainer, result: StepResult) -> None:
        for host in hosts(trainer.model):
            mosa = host.adapters["default"]
            raw_b = next(p for n, p in mosa.named_parameters() if "lora_B" in n)  # B starts at zero
            if result.step == 2:  # step 1 ran at learning rate 0 (warmup); its moments move step 1's module too
                moved.append((raw_b != 0).float().mean())
            if result.step == 3:
                assert mosa._masks is None  # every module active after the last step

    finetune(lm_options(model_dir, texts, tmp_path, steps=3, method="mosa",
                        method_options={"modules": 4, "active_modules": 1}), callbacks=[record])
    share = torch.stack(moved)
    assert ((share > 0.15) & (share < 0.6)).all()  # one or two modules of four moved, never all
    with pytest.raises(ConfigError, match="active_modules"):
        finetune(lm_options(model_dir, texts, tmp_path / "bad", method="mosa", method_options={"active_modules": 5}))


def nuclear(run: Path) -> float:
    return sum(float(torch.linalg.matrix_norm(t.reshape(t.shape[0], -1).float(), ord="nuc"))
               for k, t in adapter(run).items() if t.dim() >= 2)


def test_sara_nuclear_weight_adds_its_regulariser(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    finetune(lm_options(model_dir, texts, tmp_path / "plain", steps=3, method="sara", lr=0.05))
    finetune(lm_options(model_dir, texts, tmp_path / "nuc", steps=3, method="sara", lr=0.05,
                        method_options={"nuclear_weight": 1e3}))
    plain, regularised = adapter(tmp_path / "plain"), adapter(tmp_path / "nuc")
    assert plain.keys() == regularised.keys()
    assert any(not torch.equal(plain[k], regularised[k]) for k in plain)
