"""Kill -9 the trainer at random moments (checkpoints are written every step), resume, and check every resumption
succeeds and ends with exactly the adapter an uninterrupted run trains.

Each trial runs ``lorakit finetune`` (tiny Llama, 300 steps, a checkpoint every step) in a subprocess, sends it
SIGKILL at a random moment of its training phase (after its first checkpoint; many kills land inside a checkpoint
write),
then runs the same command with ``--resume`` (repeating it once more if the resumed run was killed before its first
checkpoint) and compares the saved adapter with a straight run's, tensor for tensor.

    python benchmarks/crash_resume.py --trials 20
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny_run import make_model_folder, make_texts

STEPS = 300


def command(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lorakit", "finetune", "--model", str(model), "--data", str(data), "--task",
            "causal-lm", "--steps", str(STEPS), "--save-every", "1", "--batch-size", "4", "--eval-size", "8",
            "--rank", "4", "--output", str(output), *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen) -> None:
    """Until the run's first checkpoint exists (training has begun) or the process ended."""
    while proc.poll() is None and not any(out.glob("checkpoint-*")):
        time.sleep(0.01)


def _training_seconds(cmd: list[str], out: Path) -> float:
    """Seconds from a run's first checkpoint to its end: the window the kills are drawn from."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_for_checkpoint(out, proc)
    started = time.perf_counter()
    proc.wait()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = make_model_folder(root / "model"), make_texts(root / "texts.jsonl")
        training = _training_seconds(command(model, data, root / "straight"), root / "straight")
        straight = run(command(model, data, root / "straight", "--overwrite"))
        assert straight.returncode == 0, straight.stderr[-2000:]
        expected = load_file(root / "straight" / "adapter_model.safetensors")
        results = []
        for trial in range(args.trials):
            out = root / f"trial{trial}"
            delay = rng.uniform(0.0, training)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.Popen(command(model, data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=env)
            _wait_for_checkpoint(out, proc)
            time.sleep(delay)
            killed = proc.poll() is None
            if killed:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            checkpoints = sorted(p.name for p in out.glob("checkpoint-*")) if out.is_dir() else []
            if not checkpoints:  # killed before the first checkpoint: nothing to resume, start again
                resumed = run(command(model, data, out, "--overwrite"))
            else:
                resumed = run(command(model, data, out, "--resume"))
            ok = resumed.returncode == 0 and (out / "adapter_model.safetensors").is_file()
            same = ok and all(torch.equal(load_file(out / "adapter_model.safetensors")[k], v)
                              for k, v in expected.items())
            fell_back = "cannot be loaded" in resumed.stderr
            results.append((trial, delay, killed, checkpoints[-1:] or ["none"], ok, same, fell_back))
            print(f"trial {trial:2d}: kill after {delay:5.2f} s ({'killed' if killed else 'had finished'}), "
                  f"newest checkpoint {checkpoints[-1] if checkpoints else 'none':>14}, resume "
                  f"{'ok' if ok else 'FAILED'}, adapter {'identical' if same else 'DIFFERENT'}"
                  f"{', fell back past a corrupt checkpoint' if fell_back else ''}", flush=True)
            if not ok:
                print(resumed.stderr[-2000:])
        good = sum(r[4] and r[5] for r in results)
        print(f"\n{good}/{len(results)} resumptions succeeded with the uninterrupted run's adapter "
              f"({sum(r[2] for r in results)} runs killed mid-way; training phase {training:.1f} s)")


if __name__ == "__main__":
    main()
