"""Per-request sampling: parameters, the next-token draw, and incremental text with stop strings.

Sampling follows the OpenAI API's meaning of each field: ``temperature == 0`` is greedy decoding (argmax, as
transformers' ``generate(do_sample=False)``), and so is any temperature below :data:`MIN_TEMPERATURE` (dividing the
logits by it would overflow to ``inf`` and the draw to ``nan``; its distribution is the argmax's anyway); otherwise
the logits are divided by ``temperature``, the smallest set of tokens whose probability reaches ``top_p`` is kept
(nucleus sampling), and one token is drawn with the request's own seeded generator, so a request's sample does not
depend on which other requests share its batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import require

MIN_TEMPERATURE = 1e-5  # below it, sampling is greedy
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer
MAX_STOP_CHARS = 4096  # all stop strings of a request together


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    Args:
        max_tokens: most new tokens to generate (the request may stop earlier on EOS or a stop string).
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_p: nucleus sampling mass, in (0, 1].
        stop: strings that end the generation; the returned text stops before the first one found.
        seed: seed of the request's random generator (``None``: a random seed).
        ignore_eos: keep generating after an end-of-sequence token.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        require(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", self.max_tokens,
                "must be an integer >= 1")
        require(0.0 <= self.temperature <= 100.0, "temperature", self.temperature, "must be in [0, 100]")
        require(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        require(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "must be non-empty strings")
        require(len(self.stop) <= 16, "stop", self.stop, "at most 16 stop strings")
        require(sum(len(s) for s in self.stop) <= MAX_STOP_CHARS, "stop", f"{sum(len(s) for s in self.stop)} chars",
                f"at most {MAX_STOP_CHARS} characters of stop strings in all (each step rescans the text they span)")
        require(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED), "seed", self.seed,
                f"must be an integer in [0, {MAX_SEED}]")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token for one row of ``logits`` (shape ``(vocab,)``)."""
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each token
        sorted_probs[before >= params.top_p] = 0.0       # keep the smallest prefix reaching top_p (>= 1 token)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Decodes a growing list of token ids into text incrementally, cutting at the first stop string.

    Each step decodes only the ids from ``_prefix`` on (one token of context before the new ones, so tokenizers that
    drop a leading space at the start of a decode still render it) and appends what is new, as transformers'
    ``TextStreamer`` does; text ending in an incomplete UTF-8 character (U+FFFD) waits for the next token. ``push``
    returns the new text that is safe to show: text that could still become the start of a stop string is held
    back until the next token decides it.
    """

    def __init__(self, tokenizer: object, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._longest = max((len(s) for s in stop), default=0)
        self._ids: list[int] = []
        self._prefix = self._read = 0  # ids[_prefix:_read] are already in ``text``; decoding restarts at _prefix
        self._shown = 0
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; returns the newly showable text (sets ``stopped`` when a stop string appeared)."""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            start = max(0, len(self.text) - self._longest + 1)  # a stop string may straddle the old end
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
            cut = min((i for i in (self.text.find(s, start) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped, self.text = True, self.text[:cut]
                return self._advance(len(self.text))
        return self._advance(len(self.text) - self._held_back(self.text))

    def finish(self) -> str:
        """The rest of the text, once generation has ended."""
        return self._advance(len(self.text))

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _held_back(self, text: str) -> int:
        for n in range(min(self._longest - 1, len(text)), 0, -1):
            if any(text.endswith(stop[:n]) for stop in self._stop if len(stop) > n):
                return n
        return 0

    def _advance(self, end: int) -> str:
        if end <= self._shown:
            return ""
        delta, self._shown = self.text[self._shown:end], end
        return delta
