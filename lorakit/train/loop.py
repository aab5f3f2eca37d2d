"""The training loop: global batches split into micro-batches and processes, AdamW with linear warmup/decay,
gradient clipping, checkpoints every N steps and on Ctrl-C, and a clear stop on NaN loss or out-of-memory.

Loss normalisation is global: each micro-batch's summed loss is divided by the number of loss terms in the whole
global batch, and gradients are summed over processes, so ``--batch-size 8`` equals ``--batch-size 4 --grad-accum 2``
and equals 2 processes with ``--batch-size 8`` (up to floating-point rounding).
"""
from __future__ import annotations

import contextlib
import logging
import pickle
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LorakitError
from ..hooks import TrainingHook
from .checkpoint import METRICS_FILE, MetricsLog, checkpoints, load_checkpoint, save_checkpoint
from .data import BatchOrder
from .ddp import SINGLE, World, sync_gradients
from .errors import TrainingError, explain_out_of_memory
from .steps import AdapterSteps, TrainConfig
from .tasks import Example, Task
from .trained import trained_parameters

log = logging.getLogger(__name__)


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


class Trainer(AdapterSteps):
    """Trains the adapter named ``default`` of ``model`` (or, with none, every weight: full fine-tuning) over
    ``examples`` with ``task``'s loss.

    ``hooks`` (:class:`~lorakit.hooks.TrainingHook`) change ranks, layers or update rules during training;
    ``callbacks`` only observe each finished step (logging, early stop).
    """

    def __init__(self, model: nn.Module, task: Task, examples: Sequence[Example], config: TrainConfig,
                 output: Path, world: World = SINGLE, callbacks: Sequence[Callback] = (),
                 hooks: Sequence[TrainingHook] = ()) -> None:
        world.check_batch(config.batch_size)
        super().__init__(model, trained_parameters(model), config, hooks)
        self.task, self.examples = task, examples
        self.output, self.world, self.callbacks = output, world, list(callbacks)
        self.order = BatchOrder(len(examples), config.global_batch, config.seed)
        self.log = MetricsLog(output / METRICS_FILE, enabled=world.main)
        self.last_checkpoint: Path | None = None

    def resume_latest(self) -> Path:
        """Continue from the newest checkpoint of the run that loads; a corrupt one (a crash during its write, a bad
        disk) is reported and the one before it tried. Returns the checkpoint used."""
        found = checkpoints(self.output)
        for checkpoint in reversed(found):
            try:
                self.resume(checkpoint)
                return checkpoint
            except (LorakitError, OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
                log.warning("checkpoint %s cannot be loaded (%s); trying the one before it", checkpoint, err)
        raise TrainingError(f"--resume: none of the checkpoints in {self.output} loads "
                            f"({', '.join(p.name for p in found) or 'none'})")

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
                self.log.write({"kind": "step", **vars(result), **self.hooks.metrics()})
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
                extra = self.hooks.forward_loss(self.model)
                share = sum(e.weight for e in mine) / total
                (sums.loss / total + (0 if extra is None else extra * share)).backward()
                loss_sum += sums.loss.item()
                tokens += int(inputs["attention_mask"].sum())
            self.regularise(1 / self.world.size)  # gradients are summed over processes
        loss_sum, tokens = sync_gradients(self.world, self.params, [loss_sum, float(tokens)])
        loss = loss_sum / total
        kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
            "no checkpoint was saved yet (use --save-every)"
        norm = self.clip(loss, "", f"{kept}. Lower --lr or check the data")
        with _deferred_interrupt():
            lr = self.apply()
        return StepResult(self.step, loss, lr, norm, int(tokens), time.perf_counter() - start)
