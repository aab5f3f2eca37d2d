"""``lorakit finetune --init``: data-driven initialisers inside a run — they see the task's loss, the result is
saved so the stock base reproduces it, and a resumed run re-initialises identically."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_finetune import adapter, lm_options, step_losses

from lorakit.errors import ConfigError
from lorakit.io.files import read_json
from lorakit.train.errors import DataError
from lorakit.train.loop import StepResult, Trainer
from lorakit.train.run import evaluate_adapter, finetune

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("init", ["lora-ga", "eva"])
def test_data_driven_init_trains_and_its_saved_adapter_reproduces_the_run(model_dir: Path, texts: Path,
                                                                           tmp_path: Path, init: str) -> None:
    opts = lm_options(model_dir, texts, tmp_path, steps=4, init=init, init_batches=2, rank=4, alpha=8.0)
    result = finetune(opts)
    plain = finetune(lm_options(model_dir, texts, tmp_path / "plain", steps=4, rank=4, alpha=8.0))
    assert step_losses(tmp_path)[0] == pytest.approx(step_losses(tmp_path / "plain")[0])  # identity at init
    assert step_losses(tmp_path)[1:] != pytest.approx(step_losses(tmp_path / "plain")[1:])  # a different start
    assert plain["before"] == result["before"]
    reloaded = evaluate_adapter(opts, str(tmp_path))  # the stock base + the saved file
    assert reloaded["after"]["loss"] == pytest.approx(result["after"]["loss"], rel=1e-5)
    ranks = read_json(tmp_path / "adapter_config.json")
    if init == "lora-ga":  # base rewritten from data: exported as a rank-2r LoRA on the stock base
        assert ranks["r"] == 8


def test_a_resumed_data_driven_run_equals_the_uninterrupted_one(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    finetune(lm_options(model_dir, texts, tmp_path / "straight", steps=5, init="lora-ga", init_batches=2, rank=4))

    def interrupt(trainer: Trainer, result: StepResult) -> None:
        if result.step == 3:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune(lm_options(model_dir, texts, run, steps=5, init="lora-ga", init_batches=2, rank=4, save_every=3),
                 callbacks=[interrupt])
    finetune(lm_options(model_dir, texts, run, steps=5, init="lora-ga", init_batches=2, rank=4, save_every=3,
                        resume=True))
    assert step_losses(run) == step_losses(tmp_path / "straight")
    for key, value in adapter(tmp_path / "straight").items():
        assert torch.equal(adapter(run)[key], value), key


def test_init_options_are_checked(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="method 'bone' has no initialiser"):
        finetune(lm_options(model_dir, texts, tmp_path / "a", method="bone", init="pissa"))
    with pytest.raises(ConfigError, match="init='lora-sb' is invalid: must be one of"):
        finetune(lm_options(model_dir, texts, tmp_path / "b", init="lora-sb"))  # a three-factor initialiser
    with pytest.raises(DataError, match="--init-batches must be >= 1"):
        finetune(lm_options(model_dir, texts, tmp_path / "c", init="eva", init_batches=0))
    assert not any(tmp_path.iterdir())  # nothing was written for a run that could not start
