"""Errors lorakit raises, and the one helper every config uses to validate a field."""
from __future__ import annotations

from typing import Any


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A configuration value breaks a rule; the message names the field, the value and the rule."""


class TargetError(LorakitError, ValueError):
    """Targeting found nothing, or found something it cannot adapt."""


class AdapterFileError(LorakitError, ValueError):
    """An adapter file is missing, corrupt, hostile or does not fit the model."""


def require(condition: bool, field: str, value: Any, rule: str) -> None:
    """Raise :class:`ConfigError` naming ``field``, ``value`` and ``rule`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}={value!r} is invalid: {rule}")
