"""``--fsdp``: two processes (torchrun, gloo on CPU) each holding half of every frozen weight (FSDP2) train the same
adapter as one unsharded process with the same global batch, and evaluate the same held-out examples."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import FILLER, make_model_folder, metrics, write_jsonl
from test_finetune_ddp import free_port

from lorakit.train.errors import DataError
from lorakit.train.fsdp import transformer_blocks
from lorakit.train.run import Options, finetune

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("quant", [[], ["--quant", "nf4", "--quant-backend", "torchao"]], ids=["fp32", "nf4"])
def test_two_sharded_processes_match_one_whole_process(tmp_path: Path, quant: list[str]) -> None:
    """fp32, and torchao's NF4 (whose codes, scales and double-quantisation factors FSDP2 shards: hidden 256 gives
    each weight an even number of them)."""
    model_dir = make_model_folder(tmp_path / "model", **({"hidden": 256, "kv_heads": 4} if quant else {}))
    rows = [{"text": " ".join(FILLER[(i * 7 + j) % len(FILLER)] for j in range(2 + i % 9))} for i in range(64)]
    data = write_jsonl(tmp_path / "texts.jsonl", rows)
    # 9 held-out examples in batches of 2: the processes hold 5 and 4, so 3 and 2 batches (lockstep pads one)
    args = ["--model", str(model_dir), "--data", str(data), "--task", "causal-lm", "--eval-size", "9",
            "--eval-batch-size", "2", "--steps", "4", "--batch-size", "8", "--lr", "5e-3"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "lorakit", "finetune", *args, *quant, "--fsdp", "--device",
               "cpu", "--output", str(tmp_path / "fsdp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    held, total = (int(n.replace(",", "")) for n in re.search(r"each holds ([\d,]+) of its ([\d,]+)",
                                                                done.stdout).groups())
    assert total / 2 <= held <= 0.51 * total  # half of every frozen weight (uneven first dimensions round up)

    finetune(Options(model=str(model_dir), data=str(data), task="causal-lm", eval_size=9, eval_batch_size=2,
                     steps=4, batch_size=8, lr=5e-3, output=str(tmp_path / "single"),
                     **({"quant": "nf4", "quant_backend": "torchao"} if quant else {})))
    sharded, single = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("fsdp", "single"))
    assert set(sharded) == set(single)
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-4, atol=1e-5 if quant else 1e-6)
    losses = [[r["loss"] for r in metrics(tmp_path / name) if r["kind"] == "step"] for name in ("fsdp", "single")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    evals = [[r for r in metrics(tmp_path / name) if r["kind"] == "eval"] for name in ("fsdp", "single")]
    assert [e["loss"] for e in evals[0]] == pytest.approx([e["loss"] for e in evals[1]], rel=1e-5)
    assert [e["examples"] for e in evals[0]] == [9, 9]


def test_fsdp_refuses_what_it_cannot_shard(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    for changes, named in (({"method": "full"}, "--method full"),
                           ({"quant": "nf4"}, "--quant nf4 --quant-backend bitsandbytes")):
        with pytest.raises(DataError, match=f"{named} is not supported with it"):
            Options(fsdp=True, **changes)
    with pytest.raises(DataError, match="processes torchrun starts"):
        finetune(Options(model=str(model_dir), data=str(texts), task="causal-lm", steps=1, fsdp=True,
                         output=str(tmp_path / "run")))


def test_blocks_are_the_models_no_split_modules(model_dir: Path) -> None:
    from lorakit.train.model import load_model

    model, _ = load_model(str(model_dir))
    blocks = transformer_blocks(model)
    assert blocks and all(type(b).__name__ == "LlamaDecoderLayer" for b in blocks)
    assert len(blocks) == model.config.num_hidden_layers
