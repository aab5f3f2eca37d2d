"""What every PEFT adapter format shares: the table entry describing one ``peft_type``, the common JSON fields,
and the key checks that refuse settings lorakit cannot honour.

Each ``peft_<type>.py`` module defines one :class:`PeftFormat`; :mod:`.adapter_files` dispatches on it by
``peft_type`` (reading) and by config class (writing), never on method names.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from ..config import AdapterConfig
from ..errors import AdapterFileError

PEFT_VERSION_WRITTEN = "0.21.2"

Tensors = dict[str, Tensor]

# Keys every PEFT config may carry that do not change a saved adapter's outputs (targets come from the tensors).
COMMON_INERT = frozenset({
    "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode",
    "peft_version", "layers_pattern", "layers_to_transform", "target_modules", "exclude_modules", "modules_to_save",
    "bias",
})
# Common keys that change outputs when set: refuse rather than load something that computes differently.
# (``modules_to_save`` is read for every format by :mod:`.adapter_files`.)
COMMON_UNSUPPORTED_WHEN_SET: dict[str, Any] = {"bias": "none"}


def _same(tensors: Tensors, config: AdapterConfig) -> Tensors:
    return tensors


@dataclass(frozen=True)
class PeftFormat:
    """One PEFT adapter type.

    Attributes:
        peft_type: PEFT's ``peft_type`` string.
        configs: the lorakit config classes written in this format (matched exactly, subclasses are not).
        to_peft: ``(config, fan_in_fan_out) ->`` the type-specific JSON fields (:func:`common_fields` adds the
            rest; ``fan_in_fan_out`` is true when the layers are GPT-2 Conv1D).
        from_peft: ``(json, source) ->`` the lorakit config.
        to_file / from_file: translate lorakit's tensor keys to the file's and back, where PEFT lays tensors out
            differently (e.g. shared random bases); identity by default.
    """

    peft_type: str
    configs: tuple[type[AdapterConfig], ...]
    to_peft: Callable[[AdapterConfig, bool], dict[str, Any]]
    from_peft: Callable[[dict[str, Any], str], AdapterConfig]
    to_file: Callable[[Tensors, AdapterConfig], Tensors] = field(default=_same)
    from_file: Callable[[Tensors, AdapterConfig], Tensors] = field(default=_same)


def common_fields(peft_type: str, target_modules: list[str] | str, base_model: str | None,
                  modules_to_save: list[str] | None = None) -> dict[str, Any]:
    """The fields every PEFT adapter_config.json written by lorakit holds."""
    return {
        "peft_type": peft_type, "peft_version": PEFT_VERSION_WRITTEN, "task_type": None, "inference_mode": True,
        "base_model_name_or_path": base_model, "revision": None, "target_modules": target_modules,
        "modules_to_save": modules_to_save or None, "layers_to_transform": None, "layers_pattern": None,
        "bias": "none",
    }


def check_keys(data: Mapping[str, Any], source: str, read: set[str] | frozenset[str],
               unsupported_when_set: Mapping[str, Any] = {}) -> None:
    """Refuse keys set to values lorakit cannot honour; warn about keys nobody reads."""
    for key, default in {**COMMON_UNSUPPORTED_WHEN_SET, **unsupported_when_set}.items():
        value = data.get(key, default)
        if value not in (default, None, [], {}, False):
            raise AdapterFileError(f"{source}: {key}={value!r} is not supported (allowed: {default!r})")
    unknown = sorted(set(data) - set(read) - COMMON_INERT - set(unsupported_when_set))
    if unknown:
        warnings.warn(f"{source}: ignoring unknown adapter_config keys {unknown}", stacklevel=4)


def require_type(data: Mapping[str, Any], peft_type: str, source: str, needed: tuple[str, ...]) -> None:
    """The JSON is of ``peft_type`` and holds every key in ``needed``."""
    if data.get("peft_type") != peft_type:
        raise AdapterFileError(f"{source}: peft_type={data.get('peft_type')!r}, expected {peft_type!r}")
    missing = [k for k in needed if k not in data]
    if missing:
        raise AdapterFileError(f"{source}: a {peft_type} config needs {missing}")
