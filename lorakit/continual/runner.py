"""A task sequence end to end: learn each task with a :class:`~lorakit.continual.learners.Learner`, score every
task after each, then (optionally) unlearn tasks with an :class:`~lorakit.continual.unlearn.Unlearner`; the result
is the :class:`~lorakit.continual.matrix.AccuracyMatrix`."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from ..errors import LorakitError
from ..train.tasks import ClassificationTask, Example
from .learners import Learner
from .loop import accuracy, label_logits
from .matrix import AccuracyMatrix
from .tasks import ContinualTask
from .unlearn import Unlearner

Encoded = tuple[ClassificationTask, list[Example], list[Example]]


def run_sequence(model: nn.Module, tokenizer: Any, tasks: Sequence[ContinualTask], learner: Learner,
                 unlearner: Unlearner | None = None, forget: Sequence[str] = (), max_length: int = 96,
                 log: Callable[[str], None] = print,
                 after_stage: Callable[[nn.Module, str], None] | None = None) -> tuple[nn.Module, AccuracyMatrix]:
    """Learn ``tasks`` in order, then unlearn the tasks named in ``forget``; returns the model (unloading may
    return it replaced) and the accuracy matrix (a row per stage). ``after_stage(model, stage)`` is called after
    each stage is scored (e.g. to measure an alignment set)."""
    names = [t.name for t in tasks]
    unknown = [f for f in forget if f not in names]
    if unknown:
        raise LorakitError(f"--forget {unknown}: not among the tasks {names}")
    if forget and unlearner is None:
        raise LorakitError("--forget needs an unlearning method (--unlearn o3 | gs-lora)")
    encoded: list[Encoded] = [t.encoded(tokenizer, max_length) for t in tasks]
    matrix = AccuracyMatrix(names)

    def score(predict: Callable = label_logits) -> list[float]:
        return [accuracy(model, scorer, held, predict) for scorer, _, held in encoded]

    matrix.before = score()
    log(f"base: {_row(names, matrix.before)}")
    for index, (task, (scorer, train, _)) in enumerate(zip(tasks, encoded)):
        losses = learner.learn(model, index, scorer, train)
        matrix.add(f"after {task.name}", score(learner.predict))
        if after_stage is not None:
            after_stage(model, matrix.stages[-1])
        log(f"after {task.name} (loss {losses[0]:.3f} -> {losses[-1]:.3f}): {_row(names, matrix.rows[-1])}")
    if forget:
        assert unlearner is not None
        model = learner.finish(model)
        for name in forget:
            index = names.index(name)
            scorer, train, _ = encoded[index]
            retained = [(s, tr) for i, (s, tr, _) in enumerate(encoded) if i != index]
            losses = unlearner.forget(model, scorer, train, retained)
            matrix.add(f"forget {name}", score(unlearner.predict))
            if after_stage is not None:
                after_stage(model, matrix.stages[-1])
            log(f"forget {name} (loss {losses[0]:.3f} -> {losses[-1]:.3f}): {_row(names, matrix.rows[-1])}")
    return model, matrix


def _row(names: Sequence[str], accuracies: Sequence[float]) -> str:
    return "  ".join(f"{n} {a:.1%}" for n, a in zip(names, accuracies))
