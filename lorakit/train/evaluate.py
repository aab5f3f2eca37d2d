"""Held-out evaluation: mean loss (and perplexity for language-model tasks), accuracy for classification, and the
majority-class rate that accuracy should be read against."""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .ddp import SINGLE, World
from .errors import explain_out_of_memory
from .tasks import Example, Task


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, examples: Sequence[Example], batch_size: int = 32,
             world: World = SINGLE, desc: str = "eval") -> dict[str, float]:
    """Metrics of ``model`` on ``examples``, shared over processes (each evaluates every ``world.size``-th one).

    Examples are batched by length to waste little on padding. In lockstep (a sharded base) a process with fewer
    batches than the others runs its first batch again, uncounted, so every process runs the same forwards.
    """
    was_training = model.training
    model.eval()
    mine = sorted(examples[world.rank::world.size], key=lambda e: len(e.input_ids))
    batches = [mine[first:first + batch_size] for first in range(0, len(mine), batch_size)]
    share = math.ceil(len(examples) / world.size)  # the largest process's examples
    most = math.ceil(share / batch_size) if world.lockstep else len(batches)
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, loss terms, correct, examples
    for i in tqdm(range(most), desc=desc, unit="batch", leave=False, disable=not world.main):
        chunk = batches[i] if i < len(batches) else list(examples[:1])  # lockstep filler
        with explain_out_of_memory(f"while evaluating with --eval-batch-size {batch_size}: reduce "
                                   f"--eval-batch-size or --max-length"):
            sums = task.loss_sums(model, task.collate(chunk))
        if i < len(batches):
            totals += torch.tensor([sums.loss.item(), sums.count, sums.correct, len(chunk)], dtype=torch.float64)
    world.all_reduce(totals)
    model.train(was_training)
    loss_sum, count, correct, n = totals.tolist()
    metrics = {"loss": loss_sum / count, "examples": int(n)}
    if task.has_accuracy:
        metrics["accuracy"] = correct / n
    else:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    return metrics


def majority_rate(held_out: Sequence[Example]) -> tuple[int, float]:
    """The most frequent class of ``held_out`` and its share: what always guessing it would score."""
    label, count = Counter(e.label for e in held_out).most_common(1)[0]
    return label, count / len(held_out)


def describe(metrics: dict[str, float]) -> str:
    """One line: ``accuracy 76.0%  loss 0.612`` or ``loss 2.31  perplexity 10.1``."""
    parts = [f"accuracy {metrics['accuracy']:.1%}"] if "accuracy" in metrics else []
    parts.append(f"loss {metrics['loss']:.4f}")
    if "perplexity" in metrics:
        parts.append(f"perplexity {metrics['perplexity']:.2f}")
    return "  ".join(parts)
