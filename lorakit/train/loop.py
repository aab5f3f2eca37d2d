"""The training loop: global batches split into micro-batches and processes, AdamW with linear warmup/decay,
gradient clipping, checkpoints every N steps and on Ctrl-C, and a clear stop on NaN loss or out-of-memory.

Loss normalisation is global: each micro-batch's summed loss is divided by the number of loss terms in the whole
global batch, and gradients are summed over processes, so ``--batch-size 8`` equals ``--batch-size 4 --grad-accum 2``
and equals 2 processes with ``--batch-size 8`` (up to floating-point rounding).
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ..inject import trainable_parameters
from ..optim import build_optimizer
from .checkpoint import METRICS_FILE, MetricsLog, load_checkpoint, save_checkpoint
from .data import BatchOrder
from .ddp import SINGLE, World, sync_gradients
from .errors import TrainingError, explain_out_of_memory
from .hooks import HookList, TrainingHook, optimized_parameters
from .tasks import Example, Task


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``batch_size`` is the global micro-batch (split over processes)."""

    steps: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 0  # 0: only the final adapter (and a checkpoint on Ctrl-C)
    optimizer: str = "adamw"  # a name in lorakit.optim.OPTIMIZERS
    optimizer_options: dict[str, Any] = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum


@dataclass
class StepResult:
    """What one optimizer step reports to the log and to callbacks."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float


Callback = Callable[["Trainer", StepResult], None]  # called after every step, e.g. to log or stop


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so an optimizer step is never half-applied."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


class Trainer:
    """Trains the adapter named ``default`` on ``model`` over ``examples`` with ``task``'s loss.

    ``hooks`` (:class:`~lorakit.train.hooks.TrainingHook`) change ranks, layers or update rules during training;
    ``callbacks`` only observe each finished step (logging, early stop).
    """

    def __init__(self, model: nn.Module, task: Task, examples: Sequence[Example], config: TrainConfig,
                 output: Path, world: World = SINGLE, callbacks: Sequence[Callback] = (),
                 hooks: Sequence[TrainingHook] = ()) -> None:
        world.check_batch(config.batch_size)
        self.model, self.task, self.examples, self.config = model, task, examples, config
        self.output, self.world, self.callbacks = output, world, list(callbacks)
        self.hooks = HookList(hooks)
        self.optimizer = build_optimizer(config.optimizer, trainable_parameters(model, "default"), lr=config.lr,
                                         weight_decay=config.weight_decay, **config.optimizer_options)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, math.ceil(config.warmup * config.steps), config.steps)
        self.order = BatchOrder(len(examples), config.global_batch, config.seed)
        self.log = MetricsLog(output / METRICS_FILE, enabled=world.main)
        self.step = 0
        self.last_checkpoint: Path | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        """The tensors trained now (hooks may prune, grow or freeze them between steps)."""
        return optimized_parameters(self.optimizer)

    def resume(self, checkpoint: Path) -> None:
        """Continue from ``checkpoint`` (RNG restored in the main process; others are re-seeded per rank)."""
        state = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler, self.hooks,
                                restore_rng=self.world.main)
        if not self.world.main:
            torch.manual_seed(self.config.seed + 7919 * self.world.rank + state["step"])
        self.step, self.last_checkpoint = state["step"], checkpoint
        self.log.rewind(self.step)

    def checkpoint(self) -> Path | None:
        """Save a checkpoint of the last completed step (main process only)."""
        current = self.last_checkpoint is not None and self.last_checkpoint.name == f"checkpoint-{self.step}"
        if self.world.main and not current:
            state = {"step": self.step, **self.order.position(self.step)}
            self.last_checkpoint = save_checkpoint(self.output, self.model, self.optimizer, self.scheduler, state,
                                                   self.hooks.state_dict())
        return self.last_checkpoint

    def train(self) -> None:
        """Run steps until ``config.steps``; on Ctrl-C save a checkpoint and re-raise."""
        self.model.train()
        self.hooks.on_train_begin(self.model, self.optimizer)
        bar = tqdm(total=self.config.steps, initial=self.step, desc="train", unit="step",
                   disable=not self.world.main, dynamic_ncols=True)
        try:
            while self.step < self.config.steps:
                result = self._step()
                self.log.write({"kind": "step", **vars(result)})
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens / result.seconds:.0f}")
                if self.config.save_every and self.step % self.config.save_every == 0:
                    self.checkpoint()
                for callback in self.callbacks:
                    callback(self, result)
        except KeyboardInterrupt:
            bar.close()
            saved = self.checkpoint()
            if self.world.main:
                print(f"\ninterrupted after step {self.step}; checkpoint saved to {saved}; continue with --resume")
            raise
        finally:
            bar.close()
            self.model.eval()

    def _step(self) -> StepResult:
        start = time.perf_counter()
        batch = [self.examples[i] for i in self.order.indices(self.step)]
        total = sum(e.weight for e in batch)  # loss terms in the global batch: the one normaliser
        loss_sum, tokens = 0.0, 0
        self.hooks.before_forward(self.model, self.step)
        with explain_out_of_memory(f"at step {self.step + 1} with --batch-size {self.config.batch_size}: reduce "
                                   f"--batch-size (raise --grad-accum to keep the global batch) or --max-length"):
            for first in range(0, len(batch), self.config.batch_size):
                mine = self.world.shard(batch[first:first + self.config.batch_size], self.config.batch_size)
                inputs = self.task.collate(mine)
                sums = self.task.loss_sums(self.model, inputs)
                (sums.loss / total).backward()
                loss_sum += sums.loss.item()
                tokens += int(inputs["attention_mask"].sum())
            extra = self.hooks.regulariser(self.model)
            if extra is not None:  # once per step; gradients are summed over processes
                (extra / self.world.size).backward()
        loss_sum, tokens = sync_gradients(self.world, self.params, [loss_sum, float(tokens)])
        loss = loss_sum / total
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
                "no checkpoint was saved yet (use --save-every)"
            raise TrainingError(f"loss is {loss} (gradient norm {norm}) at step {self.step + 1}; stopped before "
                                f"applying it: {kept}. Lower --lr or check the data")
        with _deferred_interrupt():
            lr = self.scheduler.get_last_lr()[0]
            self.hooks.before_step(self.model, self.optimizer, self.step)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.hooks.after_step(self.model, self.optimizer, self.step)
        return StepResult(self.step, loss, lr, norm, int(tokens), time.perf_counter() - start)
