"""One validation of the fine-tuning options, whoever gives them: Python, the command line or a jobs file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.train.errors import DataError
from lorakit.train.jobs import read_jobs
from lorakit.train.options import Options

BAD = [
    ({"lr": 0.0}, ["--lr", "0"], "--lr must be > 0, got 0"),
    ({"batch_size": 0}, ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ({"steps": 0}, ["--steps", "0"], "--steps must be >= 1, got 0"),
    ({"eval_size": 0}, ["--eval-size", "0"], "--eval-size must be >= 1, got 0"),
    ({"max_length": -1}, ["--max-length", "-1"], "--max-length must be >= 1, got -1"),
    ({"init_batches": 0}, ["--init-batches", "0"], "--init-batches must be >= 1, got 0"),
    ({"eval_batch_size": 0}, ["--eval-batch-size", "0"], "--eval-batch-size must be >= 1, got 0"),
    ({"epochs": -1.0}, ["--epochs", "-1"], "--epochs must be > 0, got -1"),
    ({"init": "pissaa"}, ["--init", "pissaa"], "--init 'pissaa' is unknown; choose one of: .*pissa"),
    ({"method": "full", "init": "pissa"}, ["--method", "full", "--init", "pissa"], "--method full trains every"),
]


@pytest.mark.parametrize("fields,argv,message", BAD, ids=[m.split(" ")[0] + str(i) for i, (_, _, m) in enumerate(BAD)])
def test_the_api_the_cli_and_a_jobs_file_refuse_the_same_options_alike(fields, argv, message, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(DataError, match=message):
        Options(**fields)
    assert main(["finetune", "--output", str(tmp_path / "run"), *argv]) != 0
    assert message.split(".*")[0] in capsys.readouterr().err
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"name": "a", **fields}]))
    with pytest.raises(DataError, match=f"job 0 \\('a'\\): {message}"):
        read_jobs(jobs, Options(output=str(tmp_path / "runs")))
    assert not (tmp_path / "run").exists()


def test_wrong_types_are_named_with_the_allowed_type() -> None:
    with pytest.raises(DataError, match=r"'rank' must be int, got '8'"):
        Options(rank="8")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"'steps' must be int or null, got True"):
        Options(steps=True)  # type: ignore[arg-type]
    assert Options(lr=1, epochs=2).lr == 1  # an int is a valid float
