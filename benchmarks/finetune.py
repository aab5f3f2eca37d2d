"""The embedded default fine-tune, lorakit's trainer vs PEFT + a plain PyTorch loop, in one process, interleaved.

Both train LoRA r=16 (alpha 32) on every linear layer of SmolLM2-135M-Instruct on the same batches of the default
sentiment task (same prompt, same label-logit loss, AdamW, linear schedule, clipping). Reported per variant: the
median training throughput (real, non-padding tokens per second, first step excluded as warm-up) and the peak
resident-memory growth during training over the RSS with the model loaded and adapted (psutil, sampled every 5 ms
in a thread, after returning freed heap pages to the OS): activations, gradients and optimizer state. The order of
the variants alternates between rounds.

    python benchmarks/finetune.py [--steps 10] [--rounds 2] [--batch-size 8] [--bf16]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import math
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import torch
from transformers import get_linear_schedule_with_warmup

from lorakit import LoraConfig, adapt
from lorakit.train.data import BatchOrder
from lorakit.train.loop import TrainConfig, Trainer
from lorakit.train.model import load_model
from lorakit.train.run import Options, Prepared, prepare


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so each run starts from a comparable RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak RSS growth (bytes) while the block runs, sampled by a background thread."""

    def __enter__(self) -> "PeakRSS":
        self.process, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.growth = self.peak - self.base


Job = Callable[[], list[float]]


def lorakit_job(prepared: Prepared, config: TrainConfig, out: Path) -> Job:
    """lorakit's :class:`Trainer`; the job returns the tokens/s of each step."""
    adapt(prepared.model, LoraConfig(r=16, alpha=32, targets="all-linear"), dtype=torch.float32)
    speeds: list[float] = []
    trainer = Trainer(prepared.model, prepared.task, prepared.train, config, out,
                      callbacks=[lambda t, r: speeds.append(r.tokens / r.seconds)])

    def job() -> list[float]:
        trainer.train()
        return speeds

    return job


def peft_job(prepared: Prepared, config: TrainConfig, out: Path) -> Job:
    """``peft.get_peft_model`` + a plain loop over the same batches, loss and optimizer settings."""
    import peft

    model = peft.get_peft_model(prepared.model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(config.warmup * config.steps), config.steps)
    order = BatchOrder(len(prepared.train), config.batch_size, config.seed)

    def job() -> list[float]:
        model.train()
        speeds = []
        for step in range(config.steps):
            start = time.perf_counter()
            batch = [prepared.train[i] for i in order.indices(step)]
            inputs = prepared.task.collate(batch)
            loss = prepared.task.loss_sums(model, inputs).loss / len(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            speeds.append(int(inputs["attention_mask"].sum()) / (time.perf_counter() - start))
        return speeds

    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bf16", action="store_true",
                        help="base model in bfloat16 (slower on CPUs without AVX512-BF16)")
    args = parser.parse_args()
    load_model(None)  # convert the embedded model into the cache outside the timed runs
    opts = Options(bf16=args.bf16, eval_size=200)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size)
    variants: dict[str, Callable[[Prepared, TrainConfig, Path], Job]] = {"lorakit": lorakit_job, "peft": peft_job}
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, list[int]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name in sorted(variants, reverse=round_ % 2 == 1):  # alternate which variant goes first
            with tempfile.TemporaryDirectory() as out:
                job = variants[name](prepare(opts), config, Path(out))
                release_free_memory()
                with PeakRSS() as memory:
                    speeds[name] += job()[1:]
            peaks[name].append(memory.growth)
            del job
    dtype = "bf16" if args.bf16 else "fp32"
    print(f"SmolLM2-135M, {dtype}, LoRA r=16 all-linear, batch {args.batch_size}, {args.steps} steps x "
          f"{args.rounds} rounds, torch threads {torch.get_num_threads()}")
    for name in variants:
        print(f"{name:8s} {statistics.median(speeds[name]):8.0f} tokens/s (median step)   "
              f"peak RSS growth {max(peaks[name]) / 2**20:6.0f} MiB (per round: "
              f"{', '.join(f'{p / 2**20:.0f}' for p in peaks[name])})")
    ratio = statistics.median(speeds["lorakit"]) / statistics.median(speeds["peft"])
    print(f"lorakit / peft: throughput x{ratio:.2f}, peak memory x{max(peaks['lorakit']) / max(peaks['peft']):.2f}")


if __name__ == "__main__":
    main()
