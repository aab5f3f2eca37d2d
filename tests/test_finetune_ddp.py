"""Two data-parallel processes (torchrun, gloo on CPU) train the same adapter as one process with the same global
batch: each process runs half of every micro-batch and only adapter gradients are all-reduced."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import FILLER, make_model_folder, metrics, write_jsonl

from lorakit.train.run import Options, finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    model_dir = make_model_folder(tmp_path / "model")
    rows = [{"text": " ".join(FILLER[(i * 7 + j) % len(FILLER)] for j in range(2 + i % 9))} for i in range(64)]
    data = write_jsonl(tmp_path / "texts.jsonl", rows)
    args = ["--model", str(model_dir), "--data", str(data), "--task", "causal-lm", "--eval-size", "8",
            "--steps", "4", "--batch-size", "8", "--lr", "5e-3"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "lorakit", "finetune", *args, "--output",
               str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    finetune(Options(model=str(model_dir), data=str(data), task="causal-lm", eval_size=8, steps=4, batch_size=8,
                     lr=5e-3, output=str(tmp_path / "single")))
    ddp, single = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("ddp", "single"))
    assert set(ddp) == set(single)
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-6)
    losses = [[r["loss"] for r in metrics(tmp_path / name) if r["kind"] == "step"] for name in ("ddp", "single")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    evals = [[r for r in metrics(tmp_path / name) if r["kind"] == "eval"] for name in ("ddp", "single")]
    assert [e["loss"] for e in evals[0]] == pytest.approx([e["loss"] for e in evals[1]], rel=1e-5)
