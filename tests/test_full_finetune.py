"""``lorakit finetune --method full``: every weight trains (AdamW, GaLore, LISA), checkpoints resume exactly, and the
result is a transformers model folder that reproduces the run's evaluation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import lm_options, step_losses
from transformers import AutoModelForCausalLM

from lorakit.train.errors import DataError
from lorakit.train.loop import StepResult, Trainer
from lorakit.train.run import Options, evaluate_adapter, finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("extra", [{}, {"optimizer": "galore", "optimizer_options": {"rank": 4, "update_gap": 2}},
                                   {"lisa": True, "lisa_layers": 1, "lisa_interval": 2}])
def test_full_finetune_trains_the_weights_and_saves_a_loadable_model(model_dir: Path, texts: Path, tmp_path: Path,
                                                                       extra: dict) -> None:
    opts = lm_options(model_dir, texts, tmp_path, steps=4, method="full", lr=1e-3, **extra)
    result = finetune(opts)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    stock, tuned = AutoModelForCausalLM.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(tmp_path)
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, stock.state_dict()[n])]
    assert changed  # the weights themselves were trained
    again = evaluate_adapter(Options(**{**vars(opts), "model": str(tmp_path)}), None)
    assert again["before"]["loss"] == pytest.approx(result["after"]["loss"], rel=1e-5)


def test_a_resumed_full_finetune_equals_the_uninterrupted_one(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    finetune(lm_options(model_dir, texts, tmp_path / "straight", steps=5, method="full"))

    def interrupt(trainer: Trainer, result: StepResult) -> None:
        if result.step == 3:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune(lm_options(model_dir, texts, run, steps=5, method="full", save_every=3), callbacks=[interrupt])
    assert (run / "checkpoint-3" / "model.safetensors").is_file()
    finetune(lm_options(model_dir, texts, run, steps=5, method="full", save_every=3, resume=True))
    assert step_losses(run) == step_losses(tmp_path / "straight")
    for key, value in weights(tmp_path / "straight").items():
        assert torch.equal(weights(run)[key], value), key


@pytest.mark.parametrize("bad", [{"init": "pissa"}, {"quant": "nf4"}, {"method_options": {"r": 2}}])
def test_adapter_options_are_refused_with_full(model_dir: Path, texts: Path, tmp_path: Path, bad: dict) -> None:
    with pytest.raises(DataError, match="--method full trains every weight"):
        finetune(lm_options(model_dir, texts, tmp_path, method="full", **bad))
    assert not (tmp_path / "run.json").exists()  # refused before anything was written
