"""Handing a value (or an exception) from the engine's thread to the caller that asked for it."""
from __future__ import annotations

import threading
from typing import Any, Callable

from ..errors import LorakitError


class Result:
    """A value (or exception) handed from the engine thread to a caller."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            self._error = exc
        self._done.set()

    def get(self, timeout: float | None) -> Any:
        if not self._done.wait(timeout):
            raise LorakitError("the engine did not run the call in time")
        if self._error is not None:
            raise self._error
        return self._value
