"""Trans-LoRA (METHODS.md entry 50) -- *Trans-LoRA: towards data-free Transferable Parameter Efficient Finetuning*.

Moves a LoRA from a source base to a target base with a handful of real task samples and no other data:

    (1) synthesise:   x ~ p_src(x | prompt)          the source base with its LoRA samples continuations (seeded, at
                                                      temperature tau) of prompts cut from the real samples
    (2) discriminate: D(x) = sigmoid(w . f(x) + b)    f: the source base's mean last hidden state; trained on real
                                                      (label 1) against synthetic (label 0) samples, each class
                                                      weighted to half the logistic loss
    (3) filter:       keep x with D(x) >= threshold   (the synthetic samples that look like the task)
    (4) distil:       min_theta E_x 1/T sum_t KL( p_src(. | x_<t) || p_tgt+theta(. | x_<t) )   on the kept samples:
                      the source base + LoRA is the teacher, the target base + a new LoRA ``theta`` the student

Assumptions (the paper's full recipe is richer): source and target share one tokenizer (token ids mean the same
thing; vocabulary sizes must match), as the token-level KL needs; the paper's discriminator is a LoRA classifier on
the source model, here it is a logistic probe on the frozen source base's features (:func:`sequence_features`); the
paper prompts the source model with few-shot task examples, here each prompt is the first ``prefix`` tokens of a real
sample (cycled); one synthesis round is done (the paper repeats until enough samples pass the filter; the caller can
call again with another seed); the KL is the forward token-level KL at temperature 1, sequences are unpadded.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..inject import set_active, trainable_parameters
from .icm_lora import sequence_features

Scorer = Callable[[Tensor], Tensor]
"""``scorer(ids (n, T)) -> (n,)`` probabilities that each sequence is a real task sample."""


def _check_ids(field: str, ids: Tensor, hint: str = "") -> None:
    require(ids.dim() == 2 and ids.shape[0] >= 1 and not ids.is_floating_point(), field, tuple(ids.shape),
            f"must be a non-empty (n, T) batch of token ids{hint}")


@torch.no_grad()
def synthesize(model: nn.Module, real: Tensor, count: int, new_tokens: int, *, prefix: int = 2,
               temperature: float = 1.0, seed: int = 0) -> Tensor:
    """Step 1: ``count`` sequences of ``prefix + new_tokens`` ids; sequence ``i`` starts with the first ``prefix``
    tokens of real sample ``i mod n`` and continues with tokens sampled from ``model`` as it is (its active adapters)
    at ``temperature``, with a generator seeded by ``seed``."""
    _check_ids("real", real)
    require(1 <= prefix <= real.shape[1], "prefix", prefix, f"must be in [1, {real.shape[1]}] (the real length)")
    require(count >= 1 and new_tokens >= 1, "count", (count, new_tokens), "count and new_tokens must be >= 1")
    require(temperature > 0, "temperature", temperature, "must be > 0")
    generator = torch.Generator(device=real.device).manual_seed(seed)
    ids = real[torch.arange(count, device=real.device) % real.shape[0], :prefix]
    for _ in range(new_tokens):
        probs = torch.softmax(model(input_ids=ids).logits[:, -1].float() / temperature, -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], 1)
    return ids


class Discriminator(nn.Module):
    """Step 2: a logistic head on the source base's sequence features."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.head = nn.Linear(width, 1)

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``(n,)`` of "real task sample" for features ``(n, width)``."""
        return self.head(features).squeeze(-1)

    def scorer(self, model: nn.Module) -> Scorer:
        """A :data:`Scorer` reading ``model``'s features (the source base the head was fitted on)."""
        return lambda ids: torch.sigmoid(self(sequence_features(model, ids))).detach()


def fit_discriminator(model: nn.Module, real: Tensor, synthetic: Tensor, *, steps: int = 300, lr: float = 0.05,
                      weight_decay: float = 1e-2, seed: int = 0) -> Discriminator:
    """Fit a :class:`Discriminator` (full batch, Adam) separating ``real`` (1) from ``synthetic`` (0) samples, each
    class weighted to half the loss (a handful of real samples against many synthetic ones)."""
    _check_ids("real", real)
    _check_ids("synthetic", synthetic)
    features = torch.cat([sequence_features(model, real), sequence_features(model, synthetic)])
    labels = torch.cat([torch.ones(real.shape[0]), torch.zeros(synthetic.shape[0])])
    weights = torch.cat([torch.full((real.shape[0],), 0.5 / real.shape[0]),
                         torch.full((synthetic.shape[0],), 0.5 / synthetic.shape[0])])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        discriminator = Discriminator(features.shape[1])
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = (F.binary_cross_entropy_with_logits(discriminator(features), labels, reduction="none") * weights).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return discriminator.requires_grad_(False)


def filter_synthetic(samples: Tensor, scorer: Scorer, threshold: float = 0.5) -> Tensor:
    """Step 3: the rows of ``samples`` that ``scorer`` scores ``>= threshold`` (in order; possibly none)."""
    _check_ids("samples", samples)
    require(0.0 <= threshold <= 1.0, "threshold", threshold, "must be a probability in [0, 1]")
    scores = scorer(samples)
    require(scores.shape == samples.shape[:1], "scorer", tuple(scores.shape),
            f"must return one score per sample ({samples.shape[0]},)")
    return samples[(scores >= threshold).to(samples.device)]


def _vocab(model: nn.Module) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise LorakitError(f"{type(model).__name__} has no config.vocab_size; Trans-LoRA needs a causal LM")
    return vocab


def _check_pair(teacher: nn.Module, student: nn.Module) -> None:
    require(teacher is not student, "student", type(student).__name__, "must be another model than the teacher")
    require(_vocab(teacher) == _vocab(student), "student", f"vocab_size={_vocab(student)}",
            f"must share the teacher's vocabulary (vocab_size={_vocab(teacher)}) and tokenizer")


def _logprobs(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids).logits.float().log_softmax(-1)


def _token_kl(teacher_logprobs: Tensor, student: nn.Module, ids: Tensor) -> Tensor:
    return F.kl_div(_logprobs(student, ids), teacher_logprobs, log_target=True, reduction="none").sum(-1).mean()


def kl_to_teacher(teacher: nn.Module, student: nn.Module, ids: Tensor) -> Tensor:
    """Eq. 4's objective: the mean over sequences and positions of ``KL(p_teacher || p_student)`` on ``ids``
    (differentiable in the student)."""
    _check_ids("ids", ids)
    _check_pair(teacher, student)
    with torch.no_grad():
        target = _logprobs(teacher, ids)
    return _token_kl(target, student, ids)


def distill(teacher: nn.Module, student: nn.Module, name: str, data: Tensor, *, steps: int = 200, lr: float = 1e-2,
            batch_size: int = 16, seed: int = 0) -> list[float]:
    """Step 4: train the student's adapter ``name`` (made active; nothing else trains) to minimise
    :func:`kl_to_teacher` on ``data`` (the filtered synthetic samples) with Adam, its learning rate decayed linearly
    to 0 (late Adam steps on a near-zero loss would otherwise spike), on seeded random mini-batches.
    The teacher runs as it is (its active adapters). Returns the loss of every step."""
    _check_pair(teacher, student)
    _check_ids("data", data, " (did the filter keep no synthetic sample?)")
    require(steps >= 1 and batch_size >= 1, "steps", (steps, batch_size), "steps and batch_size must be >= 1")
    params = list(trainable_parameters(student, name).values())
    require(bool(params), "name", name, "must be a student adapter with trainable tensors")
    set_active(student, name)
    with torch.no_grad():
        targets = _logprobs(teacher, data)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
        loss = _token_kl(targets[rows], student, data[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses
