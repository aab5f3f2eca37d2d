"""Differential privacy for a client's local training: DP-LoRA (METHODS.md entry 64) on DP-SGD (Abadi et al. 2016).

Each example's gradient (of its mean loss) is clipped to norm ``C`` jointly over all trained tensors, the clipped
gradients are summed, Gaussian noise ``N(0, sigma^2 C^2)`` is added and the sum is divided by the batch size.

Opacus cannot hook lorakit's adapters and ``torch.func.vmap`` fails inside transformers' mask code, so
:func:`per_sample_gradients` computes the per-example gradients exactly (one forward / backward per example); Opacus'
``DPOptimizer`` then clips, adds the noise and steps, and its RDP accountant measures the privacy spent
(:class:`PrivacyLedger`). With LoRA-FA / FFA-LoRA only ``B`` is trained, so only ``B`` is clipped and noised.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from torch import nn

from ..errors import require
from ..train.errors import TrainingError
from ..train.tasks import Example, Task


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD settings: the noise multiplier ``sigma``, or a target epsilon from which it is derived."""

    noise_multiplier: float | None = None  # sigma; None with target_epsilon set: derived
    max_grad_norm: float = 1.0  # C, the per-sample clipping norm
    target_epsilon: float | None = None  # epsilon at `delta` after the whole training (all rounds)
    delta: float = 1e-5

    def __post_init__(self) -> None:
        require((self.noise_multiplier is None) != (self.target_epsilon is None), "noise_multiplier",
                self.noise_multiplier, f"set exactly one of noise_multiplier and target_epsilon "
                f"(target_epsilon={self.target_epsilon!r})")
        if self.noise_multiplier is not None:
            require(math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0, "noise_multiplier",
                    self.noise_multiplier, "must be a finite number >= 0")
        if self.target_epsilon is not None:
            require(math.isfinite(self.target_epsilon) and self.target_epsilon > 0, "target_epsilon",
                    self.target_epsilon, "must be a finite number > 0")
        require(math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm,
                "must be a finite number > 0")
        require(0 < self.delta < 1, "delta", self.delta, "must lie in (0, 1)")

    def resolve(self, sample_rate: float, steps: int) -> float:
        """``sigma``: the given one, or the smallest (to 0.01 in epsilon) that keeps ``steps`` steps at
        ``sample_rate`` within ``target_epsilon`` at ``delta``."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        require(0 < sample_rate <= 1, "sample_rate", sample_rate, "must lie in (0, 1]")
        require(steps >= 1, "steps", steps, "must be >= 1")
        with warnings.catch_warnings():  # the search's first probe (sigma = 20) warns about its optimal RDP order
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return get_noise_multiplier(target_epsilon=self.target_epsilon, target_delta=self.delta,
                                        sample_rate=sample_rate, steps=steps, accountant="rdp")


def per_sample_gradients(model: nn.Module, params: Mapping[str, nn.Parameter], task: Task,
                         examples: Sequence[Example]) -> list[float]:
    """Set ``p.grad_sample`` (``(len(examples), *p.shape)``) of every tensor in ``params``: row ``i`` is the gradient
    of example ``i``'s mean loss (its summed loss over :attr:`Example.weight`), zeros where it does not reach ``p``.
    ``p.grad`` is left as it is. Returns each example's mean loss."""
    tensors = list(params.values())
    samples = [torch.zeros((len(examples), *p.shape), dtype=p.dtype, device=p.device) for p in tensors]
    losses = []
    for i, example in enumerate(examples):
        batch = {k: v.to(tensors[0].device) for k, v in task.collate([example]).items()}
        loss = task.loss_sums(model, batch).loss / example.weight
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for sample, grad in zip(samples, grads):
            if grad is not None:
                sample[i] = grad
        losses.append(loss.item())
    for p, sample in zip(tensors, samples):
        p.grad_sample = sample
    return losses


class PrivateSteps:
    """DP-SGD for one client's local steps: wraps a torch optimizer over ``params`` in Opacus' ``DPOptimizer``.

    The update direction is ``(sum_i clip(g_i, C) + N(0, sigma^2 C^2)) / batch_size``; ``seed`` makes the noise
    reproducible."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter], config: PrivacyConfig,
                 noise_multiplier: float, batch_size: int, seed: int | None = None) -> None:
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
        require(optimized == {id(p) for p in params.values()}, "optimizer", type(optimizer).__name__,
                "must optimize exactly the given params")
        require(math.isfinite(noise_multiplier) and noise_multiplier >= 0, "noise_multiplier", noise_multiplier,
                "must be a finite number >= 0")
        require(batch_size >= 1, "batch_size", batch_size, "must be >= 1")
        self.params = dict(params)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=next(iter(params.values())).device).manual_seed(seed)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier,
                                     max_grad_norm=config.max_grad_norm, expected_batch_size=batch_size,
                                     loss_reduction="mean", generator=generator)

    def step(self, model: nn.Module, task: Task, batch: Sequence[Example]) -> float:
        """Per-sample gradients of ``batch``, clip, noise and one optimizer step; returns the batch's mean loss (over
        examples, each the mean over its loss terms). Raises :class:`TrainingError` before any update on a
        non-finite loss."""
        losses = per_sample_gradients(model, self.params, task, batch)
        loss = math.fsum(losses) / max(len(batch), 1)
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"private step: loss is {loss}; stopped before applying it")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


class PrivacyLedger:
    """The accountant history of one client across rounds (serialisable: ``to_list()`` / ``from_list()`` of
    ``(sigma, sample_rate, steps)`` tuples)."""

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add ``steps`` steps of DP-SGD with ``noise_multiplier`` at ``sample_rate`` (merged with the last entry
        when both match, as Opacus' accountant does)."""
        require(noise_multiplier >= 0, "noise_multiplier", noise_multiplier, "must be >= 0")
        require(0 < sample_rate <= 1, "sample_rate", sample_rate, "must lie in (0, 1]")
        require(steps >= 0, "steps", steps, "must be >= 0")
        if steps == 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            steps += self.history.pop()[2]
        self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def epsilon(self, delta: float) -> float:
        """Epsilon spent at ``delta`` (Opacus' RDP accountant over the history); 0.0 when nothing was recorded."""
        require(0 < delta < 1, "delta", delta, "must lie in (0, 1)")
        if not self.history:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = list(self.history)
        return float(accountant.get_epsilon(delta=delta))

    def to_list(self) -> list[tuple[float, float, int]]:
        return list(self.history)

    @classmethod
    def from_list(cls, history: Sequence[Sequence[float]]) -> PrivacyLedger:
        """The ledger of a saved :meth:`to_list` (tuples or, after JSON, lists)."""
        ledger = cls()
        for sigma, sample_rate, steps in history:
            ledger.record(float(sigma), float(sample_rate), int(steps))
        return ledger
