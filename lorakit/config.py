"""The base of every method config: frozen, validated at construction, with targeting fields.

A method's config subclasses :class:`AdapterConfig`, adds its own fields and validates them in
``__post_init__`` (calling ``super().__post_init__()``). Lists given by users are stored as tuples so the
config stays immutable.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

from .errors import require

ALL_LINEAR = "all-linear"


def require_rank_and_alpha(r: Any, alpha: Any) -> None:
    """The common check of a low-rank config: ``r`` a positive integer, ``alpha`` a positive number."""
    require(isinstance(r, int) and r >= 1, "r", r, "must be a positive integer")
    require(isinstance(alpha, (int, float)) and alpha > 0, "alpha", alpha, "must be > 0")


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return dict(value)
    return value


@dataclass(frozen=True)
class AdapterConfig:
    """Where an adapter goes. Every method config inherits these fields.

    Attributes:
        targets: ``"all-linear"`` (every Linear / GPT-2 Conv1D except the output head), a regular expression
            that must match a whole module name, or a sequence of names each matching a module whose full name
            equals it or ends with ``"." + name`` (PEFT's rule).
        exclude: modules to leave alone, with the same rules as ``targets`` (``"all-linear"`` not allowed).
        modules_to_save: names of whole modules (a classifier head, new embeddings) that get a fully trainable copy
            per adapter, used while the adapter is active and saved with it (PEFT's ``modules_to_save``); each name
            matches a module whose full name equals it or ends with ``"." + name``. Targets never reach inside
            them. See :mod:`lorakit.modules_to_save`.
    """

    method: ClassVar[str] = ""

    targets: str | Sequence[str] = ALL_LINEAR
    exclude: str | Sequence[str] = ()
    modules_to_save: Sequence[str] = ()

    def __post_init__(self) -> None:
        for name in ("targets", "exclude", "modules_to_save"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))
        require(isinstance(self.targets, (str, tuple)), "targets", self.targets, "must be a string or a list of names")
        require(len(self.targets) > 0, "targets", self.targets, "must name at least one module")
        if isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            check_regex("targets", self.targets)
        require(isinstance(self.exclude, (str, tuple)), "exclude", self.exclude, "must be a string or a list of names")
        require(self.exclude != ALL_LINEAR, "exclude", self.exclude, "cannot be 'all-linear'")
        if isinstance(self.exclude, str) and self.exclude:
            check_regex("exclude", self.exclude)
        if self.modules_to_save is None:  # PEFT's spelling of "none"
            object.__setattr__(self, "modules_to_save", ())
        require(isinstance(self.modules_to_save, tuple), "modules_to_save", self.modules_to_save,
                "must be a list of module names")
        for name in ("targets", "exclude", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                require(all(isinstance(v, str) and v for v in value), name, value, "entries must be non-empty strings")
        object.__setattr__(self, "modules_to_save", tuple(dict.fromkeys(self.modules_to_save)))  # PEFT repeats names

    def for_module(self, module_name: str) -> "AdapterConfig":
        """The config that applies to one module (per-module patterns override fields here)."""
        return self

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields (tuples as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


MAX_PATTERN_LENGTH = 1000
# a quantified group that itself ends in a quantifier, e.g. (a+)+ or (\w*)*: exponential backtracking on a mismatch
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[+*}]\)(?:[+*]|\{\d*,)")


def check_regex(field: str, pattern: str) -> None:
    """``pattern`` compiles, is at most :data:`MAX_PATTERN_LENGTH` long and has no nested quantifier (patterns come
    from adapter files too: an untrusted pattern must not hang the process matching module names)."""
    require(isinstance(pattern, str) and len(pattern) <= MAX_PATTERN_LENGTH, field, str(pattern)[:60],
            f"must be a string of at most {MAX_PATTERN_LENGTH} characters")
    try:
        re.compile(pattern)
    except re.error as exc:
        require(False, field, pattern, f"is not a valid regular expression ({exc})")
    require(not _NESTED_QUANTIFIER.search(pattern), field, pattern,
            "nests quantifiers (like '(a+)+'), which can take exponential time to match; simplify it")


def check_patterns(field: str, patterns: Mapping[str, Any]) -> None:
    """Every key of a ``rank_pattern`` / ``alpha_pattern`` mapping is a safe regex (:func:`check_regex`)."""
    for key in patterns:
        check_regex(f"{field}[{key!r}]" if isinstance(key, str) else field, key)


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """Value of the first pattern whose regex matches the end of ``module_name`` at a dot boundary (PEFT's rule)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", module_name):
            return value
    return default
