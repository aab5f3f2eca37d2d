"""Multi-job training: K adapters, each with its own data, optimizer, schedule and seed, trained in one pass over
one frozen base model (mLoRA / LoRAFusion, METHODS.md entry 66).

Every step packs the micro-batches of every unfinished job into *mixed* forward passes of at most ``max_tokens``
padded tokens, runs the model once per pass with each row routed to its job's adapter (:func:`lorakit.route`: one
grouped product per layer over the jobs' stacked factors when every adapter is exactly ``B_eff A_eff``, see
:func:`~lorakit.routing.stacked.apply_grouped`, else one adapter call per job's rows), then hands each job the logits
of its own rows for its own task's loss. The frozen base layers run one GEMM over all jobs' rows instead of one per
job: that is where the speed comes from, while the jobs' micro-batches are too small to keep the hardware busy
(LoRAFusion's multi-job batching; its bin packing is reduced here to a greedy fill by length, its fused kernel to the
grouped ``bmm`` pair, and its pipeline staggering is not reproduced).

Each job's result equals training it alone (LoRAFusion's testable property: "multi-adapter training in one batch
gives adapter i the same gradients as training it alone on its own samples"), because

- rows never interact in the model (attention and norms are per row) and the adapters share no tensor, so the
  gradient of the summed objective with respect to job ``j``'s adapter is the gradient of job ``j``'s loss alone;
- each job's loss term is its summed loss divided by the loss terms of *its* global batch, as in
  :class:`~lorakit.train.loop.Trainer`; gradients are clipped per job; each job has its own optimizer (its
  ``TrainConfig.optimizer``), linear schedule and training hooks (its method's, e.g. DyLoRA's rank sampler);
- each job draws its batches from its own :class:`~lorakit.train.data.BatchOrder` with its own seed, and splits them
  into its own micro-batches (its padding and loss are computed on its own micro-batch, whatever pass it joins).

Up to floating-point rounding (batched GEMMs and the order of gradient accumulation sum in another order). Assumed
where the papers are vague: a job that reaches its step count leaves the batch and its adapter is final; with
dropout > 0 a job sees other (equally distributed) masks than alone, since dropout draws from the one global
generator; adapters that rewrite the shared base (PiSSA-style residual initialisations) are refused. Runs in one
process; per-job checkpoints are not written.
"""
from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import AdapterConfig
from ..hooks import TrainingHook
from ..inject import adapt, route, trainable_parameters
from .checkpoint import METRICS_FILE, MetricsLog
from .data import BatchOrder
from .errors import TrainingError, explain_out_of_memory
from .loop import StepResult, TrainConfig, _deferred_interrupt
from .steps import AdapterSteps
from .tasks import Example, Task


@dataclass(frozen=True)
class Job:
    """One fine-tuning job: adapter ``name`` (already on the model) trained on ``examples`` with ``task``'s loss.

    ``output`` receives the job's ``metrics.jsonl`` (one record per step, as a solo run writes it); ``hooks`` are the
    job's :class:`~lorakit.hooks.TrainingHook` s (e.g. its method's), called with the job's own optimizer and
    step count at the points the solo :class:`~lorakit.train.loop.Trainer` calls them.
    """

    name: str
    task: Task
    examples: Sequence[Example]
    config: TrainConfig
    output: Path
    hooks: Sequence[TrainingHook] = ()


JobCallback = Callable[[Job, StepResult], None]  # called after each of a job's steps


class _JobState(AdapterSteps):
    """One job's optimisation state (optimizer, schedule, hooks, step), data order, metrics log and step sums."""

    def __init__(self, model: nn.Module, job: Job) -> None:
        super().__init__(model, trainable_parameters(model, job.name), job.config, job.hooks)
        self.job = job
        self.order = BatchOrder(len(job.examples), job.config.global_batch, job.config.seed)
        self.log = MetricsLog(job.output / METRICS_FILE)
        self.loss_sum, self.tokens, self.total = 0.0, 0, 0

    @property
    def done(self) -> bool:
        return self.step >= self.job.config.steps

    def micro_batches(self) -> list[list[Example]]:
        """This step's global batch, split into micro-batches; resets the step's sums and calls the hooks' start."""
        self.hooks.before_forward(self.model, self.step)
        batch = [self.job.examples[i] for i in self.order.indices(self.step)]
        self.loss_sum, self.tokens = 0.0, 0
        self.total = sum(e.weight for e in batch)  # loss terms in the job's global batch: its one normaliser
        size = self.job.config.batch_size
        return [batch[first:first + size] for first in range(0, len(batch), size)]

    def checked(self) -> tuple[float, float]:
        """``(loss, gradient norm)`` of the step, gradients clipped; raises before any update on a NaN."""
        loss = self.loss_sum / self.total
        return loss, self.clip(loss, f"job {self.job.name!r}: ", "lower its lr or check its data")

    def update(self, loss: float, norm: float, seconds: float) -> StepResult:
        lr = self.apply()
        result = StepResult(self.step, loss, lr, norm, self.tokens, seconds)
        self.log.write({"kind": "step", **vars(result)})
        return result


@dataclass
class _Part:
    """One job's rows in a mixed micro-batch: its own collated batch and where its rows sit."""

    state: _JobState
    batch: dict[str, Tensor]
    rows: slice

    @property
    def width(self) -> int:
        return self.batch["input_ids"].shape[1]

    def columns(self, width: int) -> slice:
        """This job's columns in a batch padded to ``width`` (its task pads on its own side)."""
        return slice(width - self.width, width) if self.state.job.task.padding_side == "left" else \
            slice(0, self.width)


class _Replay:
    """Stands in for the model in :meth:`Task.loss_sums`: answers with logits already computed in the mixed pass.

    Its ``forward`` takes ``logits_to_keep`` like a transformers model, so a task that asks for the last position
    only gets exactly that.
    """

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits
        self.device = logits.device  # where the task moves the batch

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                logits_to_keep: int = 0) -> Any:
        return SimpleNamespace(logits=self.logits[:, -logits_to_keep:] if logits_to_keep else self.logits)

    __call__ = forward


def _pad_to(t: Tensor, width: int, left: bool, value: int) -> Tensor:
    pad = (width - t.shape[1], 0) if left else (0, width - t.shape[1])
    return torch.nn.functional.pad(t, pad, value=value)


def _mixed_inputs(parts: Sequence[_Part], width: int) -> dict[str, Tensor]:
    """The model inputs of all parts, each padded to ``width`` on its task's side (position ids as in collate)."""
    ids, masks = [], []
    for part in parts:
        task = part.state.job.task
        left = task.padding_side == "left"
        ids.append(_pad_to(part.batch["input_ids"], width, left, task.pad_id))
        masks.append(_pad_to(part.batch["attention_mask"], width, left, 0))
    mask = torch.cat(masks)
    return {"input_ids": torch.cat(ids), "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def add_job_adapter(model: nn.Module, config: AdapterConfig, name: str, seed: int,
                    initialize: Callable[[], None] | None = None) -> None:
    """Add job ``name``'s adapter (float32) exactly as a solo run seeded with ``seed`` starts it, then call
    ``initialize`` (e.g. a data-driven initialiser) with the adapter active.

    Raises :class:`TrainingError` if this rewrote a base weight (a residual initialisation such as PiSSA's): the
    base is shared, so that would change every other job.
    """
    before = {key: (t, t._version) for key, t in _model_tensors(model).items()}  # held: no storage is reused
    torch.manual_seed(seed)
    adapt(model, config, name, dtype=torch.float32)
    if initialize is not None:
        initialize()
    present = {t.untyped_storage().data_ptr() for t in _model_tensors(model).values()}
    changed = sorted(key for key, (t, version) in before.items()
                     if t._version != version or t.untyped_storage().data_ptr() not in present)
    if changed:
        raise TrainingError(f"adapter {name!r} ({config.method}) rewrote {changed[:3]} of the frozen base; jobs "
                            f"trained together share the base and must leave it as it is: train this job on its own")


def _model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``model`` by name. An in-place write bumps a tensor's version counter
    (``Tensor._version``) and a replacement drops its storage from the model: either shows a change without copying
    or hashing the weights (dense or quantised)."""
    return dict(itertools.chain(model.named_parameters(), model.named_buffers()))


# Padded tokens per mixed forward pass, by device type. On CPU, mixing stops paying at about 256 tokens a pass: the
# GEMMs are already efficient, so only the per-pass overhead is saved, and larger mixed activations fall out of cache
# (4 jobs x 256 tokens in one pass: 0.92x of running them apart; benchmarks/multijob.py, docs/benchmarks.md).
# Elsewhere (GPUs: mLoRA's and LoRAFusion's setting) every job's micro-batch joins one pass; not measured here.
MAX_TOKENS: dict[str, int] = {"cpu": 256}


def _pack(pieces: list[tuple[_JobState, list[Example]]], budget: int) -> list[list[tuple[_JobState, list[Example]]]]:
    """Micro-batches grouped into forward passes of at most ``budget`` padded tokens (a larger one runs alone).

    Greedy over the pieces sorted by length (less padding), a simple stand-in for LoRAFusion's bin packing. Which
    pass a micro-batch lands in changes only the order in which gradients are summed.
    """
    passes: list[list[tuple[_JobState, list[Example]]]] = []
    rows = width = 0
    for piece in sorted(pieces, key=lambda p: max(len(e.input_ids) for e in p[1])):
        n, w = len(piece[1]), max(len(e.input_ids) for e in piece[1])
        if passes and (rows + n) * max(width, w) <= budget:
            passes[-1].append(piece)
            rows, width = rows + n, max(width, w)
        else:
            passes.append([piece])
            rows, width = n, w
    return passes


class MultiJobTrainer:
    """Trains every job's adapter on ``model``, their micro-batches sharing mixed passes (see the module doc)."""

    def __init__(self, model: nn.Module, jobs: Sequence[Job], callbacks: Sequence[JobCallback] = (),
                 max_tokens: int | None = None) -> None:
        """``max_tokens``: padded tokens (rows x width) per forward pass; a micro-batch larger than that runs alone.
        ``None``: the device's default (:data:`MAX_TOKENS`)."""
        names = [job.name for job in jobs]
        if not jobs or len(set(names)) != len(names):
            raise TrainingError(f"multi-job training needs jobs with distinct adapter names, got {names}")
        for job in jobs:
            if not job.examples:
                raise TrainingError(f"job {job.name!r} has no training examples")
            if job.config.save_every:
                raise TrainingError(f"job {job.name!r}: save_every={job.config.save_every}, but multi-job training "
                                    f"writes no checkpoints; use 0 (train a job alone to checkpoint it)")
        self.model, self.callbacks = model, list(callbacks)
        self.states = [_JobState(model, job) for job in jobs]
        self.device = next(model.parameters()).device
        self.max_tokens = max_tokens if max_tokens is not None else MAX_TOKENS.get(self.device.type, sys.maxsize)
        if self.max_tokens < 1:
            raise TrainingError(f"max_tokens={max_tokens} must be >= 1")

    def train(self) -> None:
        """Run mixed steps until every job has done its ``config.steps``."""
        self.model.train()
        for state in self.states:
            state.hooks.on_train_begin(self.model, state.optimizer)
        longest = max(s.job.config.steps for s in self.states)
        bar = tqdm(total=longest, desc=f"train {len(self.states)} jobs", unit="step", dynamic_ncols=True)
        try:
            while active := [s for s in self.states if not s.done]:
                start = time.perf_counter()
                self._accumulate(active)
                with _deferred_interrupt():  # all jobs' updates of this step, or none
                    checked = [(state, *state.checked()) for state in active]
                    seconds = time.perf_counter() - start
                    results = [(state, state.update(loss, norm, seconds)) for state, loss, norm in checked]
                bar.update(1)
                bar.set_postfix(jobs=len(active), tok_s=f"{sum(r.tokens for _, r in results) / seconds:.0f}")
                for state, result in results:
                    for callback in self.callbacks:
                        callback(state.job, result)
        finally:
            bar.close()
            for state in self.states:
                state.optimizer.zero_grad(set_to_none=True)
            self.model.eval()

    def _accumulate(self, active: list[_JobState]) -> None:
        """Forward and backward every micro-batch of the active jobs' steps, packed into mixed passes."""
        pieces = [(state, chunk) for state in active for chunk in state.micro_batches()]
        steps = ", ".join(f"{s.job.name} step {s.step + 1}" for s in active)
        with explain_out_of_memory(f"at {steps}: reduce the jobs' batch_size (raise grad_accum to keep their "
                                   f"global batches) or max_length"):
            for packed in _pack(pieces, self.max_tokens):
                self._micro_step(packed)
            for state in active:
                state.regularise()

    def _micro_step(self, chunks: list[tuple[_JobState, list[Example]]]) -> None:
        """One mixed pass over ``chunks`` (micro-batches of one or more jobs): forward, each job's loss, backward."""
        parts, names, first = [], [], 0
        for state, examples in chunks:
            batch = {k: v.to(self.device) for k, v in state.job.task.collate(examples).items()}
            parts.append(_Part(state, batch, slice(first, first + len(examples))))
            names += [state.job.name] * len(examples)
            first += len(examples)
        width = max(part.width for part in parts)
        with route(self.model, names):
            logits = self.model(**_mixed_inputs(parts, width)).logits  # (rows of all jobs, width, V)
        terms = []
        for part in parts:
            sums = part.state.job.task.loss_sums(_Replay(logits[part.rows, part.columns(width)]), part.batch)
            terms.append(sums.loss / part.state.total)  # the job's own normalisation, as if it ran alone
            part.state.loss_sum += sums.loss.item()
            part.state.tokens += int(part.batch["attention_mask"].sum())
        torch.stack(terms).sum().backward()  # each adapter's gradient comes from its own term only
