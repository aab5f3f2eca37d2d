"""``lorakit finetune --optimizer galore --optimizer-option k=v --lisa``: the options reach the Trainer (GaLore state
in the weights_only checkpoint, LISA's single trained layer), and bad optimizer options get a clear message."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_finetune import adapter

from lorakit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def args(model_dir: Path, texts: Path, output: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model_dir), "--data", str(texts), "--task", "causal-lm", "--eval-size", "16",
            "--steps", "3", "--rank", "4", "--output", str(output), *extra]


def test_galore_and_lisa_from_the_command_line(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(args(model_dir, texts, out, "--optimizer", "galore", "--optimizer-option", "rank=2",
                     "--optimizer-option", "update_gap=2", "--lisa", "--lisa-layers", "1", "--lisa-interval", "100",
                     "--save-every", "3")) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["optimizer"] == "galore" and run["optimizer_options"] == {"rank": 2, "update_gap": 2}
    state = torch.load(out / "checkpoint-3" / "trainer.pt", weights_only=True)["optimizer"]["state"]
    projectors = [s["projector"] for s in state.values() if "projector" in s]
    assert projectors and all(p.shape[1] == 2 for p in projectors)
    trained = {k.split(".layers.")[1].split(".")[0] for k, t in adapter(out).items() if "lora_B" in k and t.any()}
    assert len(trained) == 1


def test_bad_optimizer_options_get_a_clear_message(model_dir: Path, texts: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    assert main(args(model_dir, texts, tmp_path / "a", "--optimizer", "fira", "--optimizer-option", "bogus=1")) == 2
    err = capsys.readouterr().err
    assert "has no option(s) ['bogus']" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(args(model_dir, texts, tmp_path / "b", "--optimizer-option", "no-equals-sign"))
