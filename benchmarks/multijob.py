"""K fine-tuning jobs trained together in one pass (lorakit.train.multijob) vs the same K jobs run one after the other.

Tiny Llama of benchmarks/common.py (vocab 8192, hidden 384, 8 layers, fp32); every job trains its own LoRA (rank
``--rank`` on all linear layers) on its own random token sequences (causal-lm loss), ``--steps`` steps of ``--batch``
sequences of ``--seq`` tokens. "sequential" runs K solo :class:`~lorakit.train.loop.Trainer` runs (one adapter on the
model); "together" runs one :class:`~lorakit.train.multijob.MultiJobTrainer` over K adapters, whose every step
forwards a mixed batch of K x batch rows. Both train the same adapters to the same weights (tests/test_multijob.py);
reported: training tokens per second (all jobs' tokens / time of all jobs, medians over interleaved rounds) by wall
time and by the process's CPU time (robust on a busy machine; equal to wall time on a quiet one with one thread), and
the ratios, for each per-job batch size in ``--batches``.

    python benchmarks/multijob.py [--jobs 4] [--batches 1,4,16] [--seq 64] [--steps 4] [--rounds 3]
                                  [--max-tokens N] 2>/dev/null
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from common import tiny_llama

from lorakit import LoraConfig, adapt, delete_adapter
from lorakit.train.loop import TrainConfig, Trainer
from lorakit.train.multijob import Job, MultiJobTrainer, add_job_adapter
from lorakit.train.tasks import CausalLMTask, Example

VOCAB = 8192


def job_data(k: int, n: int, seq: int) -> list[Example]:
    generator = torch.Generator().manual_seed(100 + k)
    rows = torch.randint(3, VOCAB, (n, seq), generator=generator).tolist()
    return [Example(ids, labels=list(ids)) for ids in rows]


def make_jobs(args: argparse.Namespace, batch: int, out: Path) -> list[Job]:
    task = CausalLMTask(SimpleNamespace(pad_token_id=0, eos_token_id=None), args.seq)
    return [Job(f"job{k}", task, job_data(k, batch * args.steps, args.seq),
                TrainConfig(steps=args.steps, batch_size=batch, lr=1e-3, seed=k), out / f"job{k}")
            for k in range(args.jobs)]


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a busy machine CPU time still counts only this process's work."""
    return time.perf_counter(), time.process_time()


def timed(trainer: Trainer | MultiJobTrainer) -> tuple[float, float]:
    start = clock()
    trainer.train()
    return clock()[0] - start[0], clock()[1] - start[1]


def sequential(model: torch.nn.Module, jobs: list[Job], config: LoraConfig, _max_tokens: int | None,
               ) -> tuple[float, float]:
    wall = cpu = 0.0
    for job in jobs:
        job.output.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(job.config.seed)
        adapt(model, config, "default", dtype=torch.float32)
        w, c = timed(Trainer(model, job.task, job.examples, job.config, job.output))
        wall, cpu = wall + w, cpu + c
        delete_adapter(model, "default")
    return wall, cpu


def together(model: torch.nn.Module, jobs: list[Job], config: LoraConfig, max_tokens: int | None,
             ) -> tuple[float, float]:
    for job in jobs:
        job.output.mkdir(parents=True, exist_ok=True)
        add_job_adapter(model, config, job.name, job.config.seed)
    seconds = timed(MultiJobTrainer(model, jobs, max_tokens=max_tokens))
    for job in jobs:
        delete_adapter(model, job.name)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--batches", default="1,4,16", help="per-job batch sizes to measure (comma-separated)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    parser.add_argument("--max-tokens", type=int, help="padded tokens per mixed pass (default: the device's, "
                                                       "lorakit.train.multijob.MAX_TOKENS)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = tiny_llama()
    config = LoraConfig(r=args.rank, alpha=2.0 * args.rank)
    variants = {"sequential": sequential, "together": together}
    print(f"tiny Llama fp32, {args.jobs} jobs x {args.steps} steps, LoRA r={args.rank} all-linear, seq {args.seq}, "
          f"threads={torch.get_num_threads()}, rounds={args.rounds} (medians), "
          f"max_tokens={args.max_tokens or 'default'}")
    print(f"{'batch/job':>9} {'rows/step':>9} | tok/s wall: {'sequential':>10} {'together':>9} {'ratio':>6} "
          f"| tok/CPU-s: {'sequential':>10} {'together':>9} {'ratio':>6}")
    for batch in (int(b) for b in args.batches.split(",")):
        tokens = args.jobs * args.steps * batch * args.seq
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds + 1):  # round 0 warms up
                for name, run in (variants.items() if r % 2 else reversed(variants.items())):
                    seconds = run(model, make_jobs(args, batch, Path(tmp) / f"{name}{r}"), config, args.max_tokens)
                    if r:
                        times[name].append(seconds)
        row = f"{batch:>9} {batch * args.jobs:>9} |"
        for i, label in enumerate(("tok/s wall:", "tok/CPU-s:")):
            rate = {name: tokens / statistics.median(t[i] for t in ts) for name, ts in times.items()}
            row += (f" {' ' * len(label)} {rate['sequential']:>10.0f} {rate['together']:>9.0f} "
                    f"{rate['together'] / rate['sequential']:>5.2f}x" + (" |" if i == 0 else ""))
        print(row)


if __name__ == "__main__":
    main()
