"""Errors of the training stack: bad data and runs that cannot go on. Both are :class:`LorakitError` s."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import LorakitError

_OOM_MARKERS = ("out of memory", "can't allocate memory", "DefaultCPUAllocator")


class DataError(LorakitError, ValueError):
    """A data file is missing, empty or lacks a column the task needs."""


class TrainingError(LorakitError):
    """A run cannot start or continue (output folder in use, NaN loss, out of memory, ...)."""


@contextlib.contextmanager
def explain_out_of_memory(advice: str) -> Iterator[None]:
    """Turn an out-of-memory error in the block into a :class:`TrainingError` ``"out of memory " + advice``."""
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, torch.OutOfMemoryError) or any(m in str(exc) for m in _OOM_MARKERS):
            raise TrainingError(f"out of memory {advice}") from None
        raise
