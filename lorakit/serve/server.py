"""The OpenAI-compatible HTTP API over an :class:`~lorakit.serve.engine.Engine` (FastAPI).

Routes: ``/v1/completions`` and ``/v1/chat/completions`` (Server-Sent Events with ``"stream": true``),
``/v1/models`` (the base model and every registered adapter, whose ``parent`` is the base),
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM's request shape), ``/health`` and a
Prometheus-style ``/metrics``. A request's ``model`` field names the adapter; the base model's name means no adapter
(as in vLLM and LoRAX). Errors use OpenAI's body ``{"error": {"message", "type", "code"}}``: 400 bad input (also for
malformed JSON and invalid fields), 403 runtime loading disabled, 404 unknown model/adapter, 429 with ``Retry-After``
when the waiting queue is full (the request was not accepted; every accepted request runs to completion).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import AdapterFileError, ConfigError, LorakitError
from .adapters import UnknownAdapterError, safe_adapter_path
from .engine import Engine, Output, QueueFullError, RequestError
from .protocol import (
    ChatRequest,
    CompletionRequest,
    LoadAdapterRequest,
    Reply,
    UnloadAdapterRequest,
    error_body,
)

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _status(exc: Exception) -> _HTTPError:
    if isinstance(exc, UnknownAdapterError):
        return _HTTPError(404, str(exc), "not_found_error")
    if isinstance(exc, QueueFullError):
        return _HTTPError(429, str(exc), "rate_limit_error")
    if isinstance(exc, PermissionError):
        return _HTTPError(403, str(exc), "permission_error")
    if isinstance(exc, (RequestError, ConfigError, AdapterFileError, LorakitError)):
        return _HTTPError(400, str(exc))
    raise exc


def create_app(engine: Engine, base_name: str, *, allowed_dir: str | Path | None = None,
               on_ready: Any = None, api_key: str | None = None) -> FastAPI:
    """The API app; its lifespan starts and stops ``engine``'s thread (``on_ready`` is called once started).

    ``api_key``: every endpoint then needs ``Authorization: Bearer <api_key>`` (compared in constant time; 401
    otherwise). ``allowed_dir``: where ``/v1/load_lora_adapter`` may load from; without it loading and unloading at
    run time are both refused (403).
    """
    if api_key is not None and not api_key:
        raise LorakitError("api_key is empty: give a non-empty key, or None for no authentication")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        if on_ready is not None:
            on_ready()
        yield
        engine.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan)

    if api_key is not None:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def _authenticate(request: Request, call_next: Any) -> Any:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return JSONResponse(error_body("missing or wrong API key: send 'Authorization: Bearer <key>'",
                                               "authentication_error", 401), 401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()]
        return JSONResponse(error_body("invalid request: " + "; ".join(parts), "invalid_request_error", 400), 400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in a request")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", 500), 500)

    @app.exception_handler(_HTTPError)
    async def _http_error(_: Request, exc: _HTTPError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else None
        return JSONResponse(error_body(exc.message, exc.kind, exc.status), exc.status, headers=headers)

    def adapter_of(model: str) -> str | None:
        if model == base_name:
            return None
        if model not in engine.adapters.names():
            raise _HTTPError(404, f"the model {model!r} does not exist; models: "
                                  f"{[base_name, *sorted(engine.adapters.names())]}", "not_found_error")
        return model

    async def respond(body: CompletionRequest | ChatRequest, prompt_ids: list[int], max_tokens: int | None,
                      chat: bool, raw: Request) -> Any:
        adapter = adapter_of(body.model)
        room = engine.context - len(prompt_ids)
        if room <= 0:
            raise _HTTPError(400, f"this model's context is {engine.context} tokens; the prompt has "
                                  f"{len(prompt_ids)}")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        sink = lambda out: loop.call_soon_threadsafe(queue.put_nowait, out)  # called on the engine's thread
        try:
            params = body.sampling(max_tokens if max_tokens is not None else room)
            request = engine.submit(prompt_ids, adapter, params, sink)
        except Exception as exc:
            raise _status(exc) from exc
        reply = Reply(body.model, chat, len(prompt_ids))
        if body.stream:
            return StreamingResponse(_sse(engine, request, queue, reply), media_type="text/event-stream")
        outputs = await collect(engine, request, queue, raw.is_disconnected)
        if outputs is None:
            return JSONResponse(error_body("the client went away", "request_aborted", 499), 499)
        if outputs[-1].finish_reason == "error":
            raise _HTTPError(500, outputs[-1].text or "generation failed", "server_error")
        return reply.whole(outputs)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Any:
        if isinstance(body.prompt, list):
            ids = body.prompt
        else:  # tokenising runs off the event loop: a long prompt must not stall every other connection
            ids = await asyncio.to_thread(lambda: engine.tokenizer(body.prompt).input_ids)
        return await respond(body, list(ids), body.max_tokens, chat=False, raw=raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, raw: Request) -> Any:
        tokenizer = engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise _HTTPError(400, "this model's tokenizer has no chat template; use /v1/completions")

        def encode() -> list[int]:
            text = tokenizer.apply_chat_template([m.model_dump() for m in body.messages], tokenize=False,
                                                 add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False).input_ids

        ids = await asyncio.to_thread(encode)
        return await respond(body, ids, body.max_completion_tokens or body.max_tokens, chat=True, raw=raw)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        def card(name: str, parent: str | None) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": 0, "owned_by": "lorakit", "root": name,
                    "parent": parent}

        return {"object": "list", "data": [card(base_name, None),
                                           *(card(n, base_name) for n in engine.adapters.names())]}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest) -> PlainTextResponse:
        try:
            path = safe_adapter_path(body.lora_path, allowed_dir)
            if body.lora_name == base_name:
                raise LorakitError(f"{body.lora_name!r} is the base model's name; pick another adapter name")
            await asyncio.to_thread(engine.call, lambda: engine.adapters.register(body.lora_name, path))
        except Exception as exc:
            raise _status(exc) from exc
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest) -> PlainTextResponse:
        if allowed_dir is None:
            raise _status(PermissionError("unloading adapters at run time is disabled; start the server with "
                                          "--allowed-dir DIR to allow runtime updates"))
        if body.lora_name not in engine.adapters.names():
            raise _HTTPError(404, f"unknown adapter {body.lora_name!r}", "not_found_error")
        try:
            await asyncio.to_thread(engine.call, lambda: engine.adapters.unregister(body.lora_name))
        except Exception as exc:
            raise _status(exc) from exc
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine thread serves; 503 when it has stopped (requests would not be answered)."""
        body = {"status": "ok" if engine.healthy else "unavailable", "running": engine.num_running,
                "waiting": engine.num_waiting, "engine_crashes": engine.crashes}
        return JSONResponse(body, 200 if engine.healthy else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        engine.metrics.set("adapters_registered", len(engine.adapters.names()), help="adapters the server can route to")
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def collect(engine: Engine, request: Any, queue: asyncio.Queue,
                  disconnected: Callable[[], Awaitable[bool]]) -> list[Output] | None:
    """A non-streaming request's outputs up to its finish; ``None`` when its client went away first (checked every
    :data:`DISCONNECT_POLL_S` seconds while waiting), and then the request is aborted, freeing its batch slot."""
    outputs: list[Output] = []
    pending = asyncio.ensure_future(queue.get())  # kept across polls: a timed-out wait never loses an output
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
            if done:
                outputs.append(pending.result())
                if outputs[-1].finish_reason is not None:
                    return outputs
                pending = asyncio.ensure_future(queue.get())
            elif await disconnected():
                engine.abort(request)
                return None
    except asyncio.CancelledError:
        engine.abort(request)
        raise
    finally:
        pending.cancel()


async def _sse(engine: Engine, request: Any, queue: asyncio.Queue, reply: Reply) -> AsyncIterator[str]:
    """Server-Sent Events: one ``data:`` line per piece of text, then ``data: [DONE]``; aborts the request when the
    client goes away before it finished."""
    first, finished = True, False
    try:
        while not finished:
            out: Output = await queue.get()
            finished = out.finish_reason is not None
            if out.finish_reason == "error":
                yield f"data: {json.dumps(error_body(out.text or 'generation failed', 'server_error', 500))}\n\n"
                break
            if out.text or first or finished:
                yield f"data: {json.dumps(reply.chunk(out, first))}\n\n"
                first = False
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            engine.abort(request)
