"""MTLoRA (Agiza et al., CVPR 2024): a task-agnostic LoRA shared by every task plus a task-specific LoRA per task.

    names = add_tasks(model, lorakit.LoraConfig(r=8, targets=[...]), ["seg", "depth"])   # ["shared", "seg", "depth"]
    with tasks(model, "shared", ["seg", "depth"], ["seg", "depth", "seg"]):   # one task per row of the batch
        out = model(x)          # row b, every layer: W x + dW_shared x + dW_{task(b)} x

Equation (per layer, row ``b`` of task ``t``): ``h = W x + B_sh A_sh x + B_t A_t x``. It runs as a weighted mixture
(:func:`lorakit.mix`) with per-row weights: 1 on the shared adapter, 1 on the row's task adapter, 0 elsewhere, so
task ``t``'s loss reaches only the shared adapter and ``TS_t``: another task adapter gets no gradient (``None``: none
of its rows in the batch under sparse dispatch) or exactly zero (its rows are in the batch but not in the loss, or
a dense path ran it at weight 0).

What the abstract leaves open, and what is assumed here:

* The paper's backbone is a hierarchical vision transformer whose stages end in TS-LoRA modules feeding one decoder
  per task; an image goes through every task branch. Here one row is one (input, task) pair: to get all tasks' outputs
  for the same inputs, repeat the rows once per task (``row_tasks = [t for t in tasks for _ in range(B)]``).
* Where the task adapters sit (the paper: the ends of backbone stages) is left to ``task_config``'s targets; a layer
  holding only the shared adapter computes ``W x + dW_shared x``.
* Both kinds of adapters are plain LoRA (any lorakit method config works); the paper's scaling and ranks are
  whatever the configs say.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import LorakitError, require
from ..inject import _check_names, adapt
from ..mixing import mix
from ..routing.weighted import WeightedRouting


def add_tasks(model: nn.Module, config: AdapterConfig, task_names: Sequence[str], shared: str = "shared",
              task_config: AdapterConfig | None = None) -> list[str]:
    """Add the shared adapter ``shared`` (``config``) and one adapter per task (``task_config``, default ``config``),
    none of them active; returns ``[shared, *task_names]``."""
    _check_tasks(shared, task_names)
    adapt(model, config, shared, activate=False)
    for name in task_names:
        adapt(model, task_config or config, name, activate=False)
    return [shared, *task_names]


def task_weights(task_names: Sequence[str], row_tasks: Sequence[str | int]) -> Tensor:
    """The ``(rows, 1 + T)`` mixture weights: column 0 (the shared adapter) is 1, column ``1 + t`` is 1 on the rows
    of task ``t``. ``row_tasks``: a task name or index per row (a list, or a 1-D integer tensor)."""
    if isinstance(row_tasks, Tensor):
        require(row_tasks.dim() == 1 and not row_tasks.is_floating_point(), "row_tasks", tuple(row_tasks.shape),
                "a tensor of tasks must be 1-D and of integers (one task index per row)")
        row_tasks = row_tasks.tolist()
    require(len(row_tasks) > 0, "row_tasks", list(row_tasks), "must give one task per row of the batch")
    index = {name: i for i, name in enumerate(task_names)}
    rows = []
    for row, task in enumerate(row_tasks):
        if isinstance(task, bool) or not isinstance(task, (str, int)) or \
                (isinstance(task, int) and not 0 <= task < len(task_names)) or \
                (isinstance(task, str) and task not in index):
            raise LorakitError(f"row {row}: task {task!r} is not one of the tasks {list(task_names)} "
                               f"(give a task name or an index in [0, {len(task_names)}))")
        rows.append(index[task] if isinstance(task, str) else task)
    weights = torch.zeros(len(rows), 1 + len(task_names))
    weights[:, 0] = 1.0
    weights[torch.arange(len(rows)), 1 + torch.tensor(rows)] = 1.0
    return weights


@contextlib.contextmanager
def tasks(model: nn.Module, shared: str, task_names: Sequence[str], row_tasks: Sequence[str | int],
          dispatch: str = "sparse") -> Iterator[WeightedRouting]:
    """Within the block, row ``b`` of every batch computes ``W x + dW_shared x + dW_{row_tasks[b]} x`` at each
    layer. ``dispatch="dense"`` runs every task adapter on every row (weight 0 off its task): the same outputs,
    but every task adapter then gets a (zero) gradient."""
    _check_tasks(shared, task_names)
    _check_names(model, [shared, *task_names])
    first = next(model.parameters(), None)
    weights = task_weights(task_names, row_tasks)
    if first is not None:
        weights = weights.to(first.device)
    with mix(model, [shared, *task_names], weights, dispatch) as routing:
        yield routing


def _check_tasks(shared: str, task_names: Sequence[str]) -> None:
    require(not isinstance(task_names, str) and len(task_names) > 0 and len(set(task_names)) == len(task_names),
            "task_names", task_names, "must be a list of one or more distinct adapter names")
    require(shared not in task_names, "shared", shared, f"must not be one of the task adapters {list(task_names)}")
