"""OpenAI-compatible request bodies (validated with pydantic) and response payloads.

Field names and defaults follow the OpenAI API (``max_tokens`` 16 for completions, none for chat, i.e. up to the
context; ``temperature`` 1; ``top_p`` 1) with vLLM's extensions ``ignore_eos`` and the runtime LoRA endpoints'
``lora_name`` / ``lora_path``. Unknown fields are ignored, as OpenAI-compatible servers do.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from .engine import Output
from .sampling import SamplingParams


class _Sampling(BaseModel):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: Literal[1] = 1
    ignore_eos: bool = False

    def sampling(self, max_tokens: int) -> SamplingParams:
        """The engine's parameters (validated there: a bad value raises ``ConfigError``, answered with 400)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, stop=stop,
                              seed=self.seed, ignore_eos=self.ignore_eos)


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=128)


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class Reply:
    """Builds the response objects of one completion or chat request (whole, or as stream chunks)."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int) -> None:
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.completion_tokens = 0

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def chunk(self, out: Output, first: bool = False) -> dict[str, Any]:
        """One streamed piece (the first chat chunk also carries ``role``)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if out.text or first:
                delta["content"] = out.text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": out.finish_reason}
        else:
            choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
        return {**self._head(True), "choices": [choice]}

    def whole(self, outputs: list[Output]) -> dict[str, Any]:
        """The non-streamed response, from all of a request's outputs."""
        self.completion_tokens = sum(len(o.token_ids) for o in outputs)
        text, reason = "".join(o.text for o in outputs), outputs[-1].finish_reason
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._head(False), "choices": [choice], "usage": self.usage()}
