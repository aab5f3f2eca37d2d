"""benchmarks/gpu.py runs end to end at smoke shapes on the CPU, so a session lent a GPU spends its minutes measuring,
not debugging the script."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_gpu_benchmark_prints_every_table_at_smoke_shapes() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCHMARKS.parent)}
    done = subprocess.run([sys.executable, "gpu.py", "--smoke", "--device", "cpu"], cwd=BENCHMARKS, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for variant in ("frozen base (floor)", "full fine-tuning", "lorakit LoRA", "PEFT LoRA", "lorakit DoRA",
                    "PEFT DoRA"):
        assert re.search(rf"\| {re.escape(variant)} \| [\d,]+ \| [\d.]+ \| [\d.]+x \|", out), variant
    row = r"\| (decode|prefill) B=\d+ T=\d+ \| \d+ \| \d+ \| [\d.]+ \| [\d.]+x \| [\d.]+x \|"
    assert len(re.findall(row, out)) == 4
    assert re.search(r"finetune on cpu .*: [\d,]+ training tokens/s", out)
