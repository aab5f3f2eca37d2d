"""Serving many adapters over one base model: continuous-batching engine and OpenAI-compatible server.

The engine (:mod:`.engine`) needs only torch and transformers; the HTTP server (:mod:`.server`, ``lorakit serve``)
needs the ``serve`` extra (FastAPI, uvicorn).
"""
from .engine import Engine, Output, QueueFullError, RequestError
from .sampling import SamplingParams

__all__ = ["Engine", "Output", "QueueFullError", "RequestError", "SamplingParams"]
