"""Where adapters go: resolve a config's ``targets`` / ``exclude`` against a model's module names."""
from __future__ import annotations

import re
from typing import Iterator

from torch import nn

from .config import ALL_LINEAR, AdapterConfig
from .errors import TargetError
from .hosts.geometry import SUPPORTED_LAYERS, is_linear_like, is_supported
from .hosts.host import HostLayer


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` for every module a user could name; a host layer stands for its base layer."""
    hosted: set[str] = set()
    for path, module in model.named_modules():
        if any(path.startswith(h + ".") for h in hosted):
            continue
        if isinstance(module, HostLayer):
            hosted.add(path)
        yield path, module


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, HostLayer) else module


def _matches(rule: str | tuple[str, ...], path: str) -> bool:
    if isinstance(rule, str):
        return bool(rule) and re.fullmatch(rule, path) is not None
    return any(path == key or path.endswith("." + key) for key in rule)


def _output_head_paths(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {path for path, m in model.named_modules() if head is not None and _base_of(m) is head}


def find_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """Modules selected by ``config``; a clear error when nothing matches or a match cannot be adapted."""
    heads = _output_head_paths(model)
    found: list[tuple[str, nn.Module]] = []
    for path, module in candidate_modules(model):
        if not path:
            continue
        base = _base_of(module)
        if config.targets == ALL_LINEAR:
            selected = is_linear_like(base) and path not in heads
        else:
            selected = _matches(config.targets, path)
        if not selected or _matches(config.exclude, path):
            continue
        if not is_supported(base):
            if config.targets == ALL_LINEAR or isinstance(config.targets, str):
                continue  # broad rules skip containers; exact names below must be adaptable
            raise TargetError(
                f"target {path!r} is a {type(base).__name__}, which cannot be adapted; "
                f"supported layers: {', '.join(SUPPORTED_LAYERS)}"
            )
        found.append((path, module))
    if not found:
        names = [p for p, m in candidate_modules(model) if p and is_supported(_base_of(m))][:12]
        raise TargetError(
            f"targets={config.targets!r} (exclude={config.exclude!r}) matched no adaptable module; "
            f"some adaptable modules of this model: {names}"
        )
    return found
