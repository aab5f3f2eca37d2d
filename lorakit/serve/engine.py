"""Continuous-batching generation over one base model and many adapters (S-LoRA, METHODS.md entry 65).

Every loop iteration (:meth:`Engine.step`) first admits waiting requests, prefilled together (left-padded, at most
:data:`PREFILL_TOKENS` padded tokens per forward, each row with its own adapter) and joined to the running batch, then
runs **one decode step for all running requests together**, each row routed to its own adapter (``lorakit.route``:
the segment path, or the adapter pool's stacked path when it is installed). When every running row's adapter sits in
an adapter pool's slots and the Triton kernels can run (a GPU), the decode step runs with static shapes and is
replayed from CUDA graphs (:mod:`.graphs`). Requests leave the batch the step they finish, so the batch changes at
token granularity (S-LoRA section 3 / Orca's iteration-level scheduling). The waiting queue is bounded:
:meth:`Engine.submit` raises :class:`QueueFullError` rather than letting a burst grow memory without limit.

Assumptions where the paper leaves it open: first-come first-served admission; a request whose adapter cannot be
made resident (pool full of adapters in use) waits at the head of the queue; a batched prefill takes the admitted
requests in arrival order.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..errors import LorakitError
from ..inject import route
from .adapters import AdapterSet, AttachedAdapters, UnknownAdapterError
from .graphs import StaticDecode
from .handoff import Result
from .kv import BatchKV
from .metrics import Metrics
from .sampling import SamplingParams, TextStream, make_generator, sample

log = logging.getLogger(__name__)

PREFILL_TOKENS = 512  # padded prompt tokens (rows x longest prompt) per batched prefill forward


class QueueFullError(LorakitError):
    """The waiting queue is full; the client should retry later."""


class RequestError(LorakitError, ValueError):
    """A request cannot be served as given (e.g. its prompt does not fit the context)."""


@dataclass(frozen=True)
class Output:
    """One streamed piece of a request: new text, new token ids, and why it ended (``None`` while running)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error"


@dataclass(eq=False)
class Request:
    id: int
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Callable[[Output], None]
    arrival: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    aborted: bool = False
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    finished: bool = False  # set by Engine._finish, which runs once per request


class Engine:
    """Schedules and runs requests; drive it with :meth:`step` or run it in a thread with :meth:`start`.

    Args:
        model: a transformers causal LM (adapters attached by ``adapters`` or by the caller).
        tokenizer: its tokenizer (decodes streamed text, provides EOS).
        adapters: where adapter names resolve (default: the adapters already attached to ``model``).
        max_batch: most requests decoded together.
        max_waiting: most requests waiting for a batch slot; more are refused with :class:`QueueFullError`.
        context: most tokens (prompt + generated) per request (default: the model's ``max_position_embeddings``).
        graphs: decode with static shapes, captured in CUDA graphs on a GPU (:mod:`.graphs`) when every row's adapter
            is in an adapter pool's slots; default: on a GPU. ``False``: always the dynamic step.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, adapters: AdapterSet | None = None, *, max_batch: int = 32,
                 max_waiting: int = 256, context: int | None = None, metrics: Metrics | None = None,
                 graphs: bool | None = None) -> None:
        if max_batch < 1 or max_waiting < 0:
            raise LorakitError(f"max_batch={max_batch} must be >= 1 and max_waiting={max_waiting} >= 0")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.adapters = adapters if adapters is not None else AttachedAdapters(model)
        self._mixtures = getattr(self.adapters, "mixtures", None)  # served mixtures (lorakit.serve.mixtures)
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.context = context or getattr(model.config, "max_position_embeddings", None) or 2048
        self.device = next(model.parameters()).device
        self.eos = _eos_ids(model, tokenizer)
        self.vocab = model.get_input_embeddings().num_embeddings
        self.metrics = metrics or Metrics()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._kv = BatchKV()
        table = getattr(self.adapters, "slot_table", None)
        wanted = self.device.type == "cuda" if graphs is None else graphs
        self._static = StaticDecode(model, table) if wanted and table is not None else None
        self._calls: deque[tuple[Callable[[], Any], Result]] = deque()
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.crashes = 0  # loop iterations that failed outside a step's own error handling

    # -- submitting (any thread) -----------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], adapter: str | None, params: SamplingParams,
               sink: Callable[[Output], None]) -> Request:
        """Queue a request; ``sink`` receives its :class:`Output` pieces from the engine's thread."""
        if adapter is not None and adapter not in self.adapters.names():
            raise UnknownAdapterError(f"unknown adapter {adapter!r}; registered: {sorted(self.adapters.names())}")
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < self.vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {self.vocab})")
        if len(prompt_ids) + params.max_tokens > self.context:
            raise RequestError(f"this model's context is {self.context} tokens; the prompt has {len(prompt_ids)} "
                               f"and max_tokens={params.max_tokens} asks for more")
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                self.metrics.inc("requests_rejected_total", help="requests refused because the queue was full")
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests); retry later")
            request = Request(next(self._ids), list(prompt_ids), adapter, params, sink)
            self._waiting.append(request)
            self._cond.notify()
        return request

    def abort(self, request: Request) -> None:
        """Stop ``request`` at the next step (e.g. its client went away)."""
        request.aborted = True

    def call(self, fn: Callable[[], Any], timeout: float | None = 60.0) -> Any:
        """Run ``fn`` on the engine's thread between steps (e.g. load an adapter) and return its result."""
        result = Result()
        with self._cond:
            self._calls.append((fn, result))
            self._cond.notify()
        if self._thread is None:
            self._run_calls()
        return result.get(timeout)

    def generate(self, prompt_ids: Sequence[int], adapter: str | None = None,
                 params: SamplingParams | None = None) -> Iterator[Output]:
        """Submit one request and yield its outputs (runs the engine inline when no thread is started)."""
        pieces: deque[Output] = deque()
        done = threading.Event()

        def sink(out: Output) -> None:
            pieces.append(out)
            if out.finish_reason is not None:
                done.set()

        self.submit(prompt_ids, adapter, params or SamplingParams(), sink)
        while not done.is_set() or pieces:
            if pieces:
                yield pieces.popleft()
            elif self._thread is None:
                self.step()
            else:
                done.wait(0.05)

    @property
    def healthy(self) -> bool:
        """The engine thread is running (or the engine is driven inline: no thread was started)."""
        return self._thread is None or (self._thread.is_alive() and not self._stopping)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # -- the loop (engine thread) ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify()
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._running or self._calls):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # a bug outside the step's own handling: fail what is in flight, keep serving
                self.crashes += 1
                log.exception("engine loop iteration failed; failing the requests in flight")
                self._fail_all()

    def _fail_all(self) -> None:
        for request in self._running:
            self._finish(request, "", "error")
        self._running, self._kv = [], BatchKV()

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: pending calls, admissions (prefill), then one decode step of the running batch."""
        self._run_calls()
        try:
            self._drop_aborted()
            self._admit()
            if self._running:
                self._decode()
        except Exception:  # a failed forward must not kill the server: fail the batch (finish "error"), keep serving
            log.exception("engine step failed")
            self._fail_all()
        self.metrics.set("requests_running", len(self._running), help="requests in the running batch")
        self.metrics.set("requests_waiting", len(self._waiting), help="requests waiting for a batch slot")

    def _run_calls(self) -> None:
        while self._calls:
            with self._cond:
                fn, result = self._calls.popleft()
            result.run(fn)

    def _drop_aborted(self) -> None:
        with self._cond:
            for request in [r for r in self._waiting if r.aborted]:
                self._waiting.remove(request)
                self.metrics.inc("requests_finished_total", label="abort", help="finished requests by reason")
        gone = [i for i, r in enumerate(self._running) if r.aborted]
        for i in gone:
            self._finish(self._running[i], "", "abort")
        if gone:
            self._remove(gone)

    def _admit(self) -> None:
        admitted: list[Request] = []
        while len(self._running) + len(admitted) < self.max_batch and self._waiting:
            with self._cond:
                request = self._waiting[0]
            names = [request.adapter] if request.adapter is not None else []
            try:
                if request.adapter is not None and request.adapter not in self.adapters.names():
                    raise UnknownAdapterError(f"adapter {request.adapter!r} was unregistered")
                self.adapters.acquire(names)
            except LorakitError as exc:
                if (self._running or admitted) and not isinstance(exc, UnknownAdapterError):
                    break  # no slot for its adapter now: wait for running requests to release theirs
                with self._cond:
                    self._waiting.popleft()
                request.sink(Output(f"adapter {request.adapter!r} cannot be served: {exc}", [], "error"))
                continue
            with self._cond:
                self._waiting.popleft()
            admitted.append(request)
        for chunk in _chunks(admitted, PREFILL_TOKENS):
            try:
                self._prefill(chunk)
            except Exception:
                log.exception("prefill of requests %s failed", [r.id for r in chunk])
                for request in chunk:
                    self._finish(request, "", "error")

    def _prefill(self, chunk: list[Request]) -> None:
        """One forward over the chunk's prompts, left-padded, each row routed to its request's adapter."""
        width = max(len(r.prompt_ids) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=self.device)  # padding: masked out
        mask = torch.zeros_like(ids)
        for row, request in enumerate(chunk):
            request.stream = TextStream(self.tokenizer, request.params.stop)
            request.generator = make_generator(request.params.seed, self.device)
            n = len(request.prompt_ids)
            ids[row, width - n:] = torch.tensor(request.prompt_ids, device=self.device)
            mask[row, width - n:] = 1
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.model.config)
        with route(self.model, [r.adapter for r in chunk], self._mixtures):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
        self.metrics.inc("prompt_tokens_total", int(mask.sum()), help="prompt tokens prefilled")
        going = [row for row, request in enumerate(chunk) if not self._emit_or_fail(request, out.logits[row, -1])]
        if going:
            self._kv.join(out.past_key_values, mask, going)  # first: a failure here leaves the batch as it was
            self._running.extend(chunk[row] for row in going)

    def _decode(self) -> None:
        tokens, names = [r.generated[-1] for r in self._running], [r.adapter for r in self._running]
        mask, positions = self._kv.step_inputs()
        slots = self._static_slots(names)
        if slots is not None:
            logits = self._static.step(self._kv, tokens, slots, mask, positions)
        else:
            last = torch.tensor(tokens, device=self.device).unsqueeze(1)
            with route(self.model, names, self._mixtures):
                logits = self.model(input_ids=last, attention_mask=mask, position_ids=positions,
                                    past_key_values=self._kv.cache, use_cache=True).logits[:, -1]
        self._kv.step_done()
        done = [i for i, request in enumerate(self._running) if self._emit_or_fail(request, logits[i])]
        if done:
            self._remove(done)

    def _static_slots(self, names: list[str | None]) -> list[int] | None:
        """Each row's pool slot (-1: the base model) when the static decode step applies to these rows, else
        ``None`` (an adapter attached as a module or a mixture: the dynamic step)."""
        if self._static is None:
            return None
        slots = [-1 if name is None else self._static.table.slots.get(name) for name in names]
        return slots if self._static.applies(slots) else None

    def _remove(self, rows: list[int]) -> None:
        drop = set(rows)
        self._kv.keep([i for i in range(len(self._running)) if i not in drop])
        self._running = [r for i, r in enumerate(self._running) if i not in drop]

    def _emit_or_fail(self, request: Request, logits: Tensor) -> bool:
        """:meth:`_emit`, or, when sampling or streaming this request fails, finish it alone with "error"; returns
        whether the request has finished."""
        try:
            return self._emit(request, logits)
        except Exception:
            log.exception("request %s failed", request.id)
            self._finish(request, "", "error")
            return True

    def _emit(self, request: Request, logits: Tensor) -> bool:
        """Sample the next token of ``request``, stream it; returns whether the request has finished."""
        token = sample(logits, request.params, request.generator)
        request.generated.append(token)
        self.metrics.inc("generation_tokens_total", help="tokens generated")
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
            self.metrics.observe("time_to_first_token_seconds", request.first_token_at - request.arrival,
                                 help="time from arrival to the first token")
        eos = token in self.eos and not request.params.ignore_eos
        text = "" if eos else request.stream.push(token)
        reason = ("stop" if eos or request.stream.stopped else
                  "length" if len(request.generated) >= request.params.max_tokens
                  or len(request.prompt_ids) + len(request.generated) >= self.context else None)
        if reason is None:
            request.sink(Output(text, [token]))
            return False
        self._finish(request, text, reason, [token])
        return True

    def _finish(self, request: Request, text: str, reason: str, tokens: list[int] | None = None) -> None:
        """End ``request`` (once: a request already finished is left alone) and release its adapter."""
        if request.finished:
            return
        request.finished = True
        if request.adapter is not None:
            self.adapters.release([request.adapter])
        if reason in ("stop", "length"):
            text += request.stream.finish()
        self.metrics.inc("requests_finished_total", label=reason, help="finished requests by reason")
        self.metrics.observe("request_latency_seconds", time.perf_counter() - request.arrival,
                             help="time from arrival to the last token")
        request.sink(Output(text, tokens or [], reason))


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return ids


def _chunks(requests: list[Request], budget: int) -> list[list[Request]]:
    """Consecutive groups of ``requests`` whose padded prompts (rows x longest) fit ``budget`` (one at least)."""
    chunks: list[list[Request]] = []
    longest = 0
    for request in requests:
        n = len(request.prompt_ids)
        if chunks and (len(chunks[-1]) + 1) * max(longest, n) <= budget:
            chunks[-1].append(request)
            longest = max(longest, n)
        else:
            chunks.append([request])
            longest = n
    return chunks
