"""Routers of weighted routing on disk: ``router_config.json`` (kind and config) + ``router.safetensors``.

    lorakit.io.routers.save_router(model, "out/moe", "moe")
    lorakit.io.routers.load_router(other_model, "out/moe", "moe")    # rebuilt, checked, registered

The kind names a class of :data:`~lorakit.routing.routers.ROUTER_KINDS` (``"gate"``: :class:`GateRouter`) whose
``config()`` rebuilds it; the tensors must match the rebuilt router's exactly (names and shapes).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterFileError, LorakitError
from ..inject import routers
from ..mixing import add_router
from ..routing.routers import ROUTER_KINDS
from .files import read_json, read_safetensors, write_json, write_safetensors

CONFIG_FILE, WEIGHTS_FILE = "router_config.json", "router.safetensors"


def save_router(model: nn.Module, directory: str | Path, name: str) -> Path:
    """Write router ``name`` of ``model`` to ``directory`` (atomically, file by file); returns the folder."""
    found = routers(model)
    if name not in found:
        raise LorakitError(f"unknown router {name!r}; this model has: {sorted(found) or 'none'}")
    router = found[name]
    kind = getattr(router, "kind", None)
    if kind not in ROUTER_KINDS:
        raise LorakitError(f"router {name!r} ({type(router).__name__}) is not a registered router kind; "
                           f"kinds: {ROUTER_KINDS.names()}")
    directory = Path(directory)
    tensors = {k: v.detach().contiguous() for k, v in router.state_dict().items()}
    write_safetensors(directory / WEIGHTS_FILE, tensors, {"format": "pt"})
    write_json(directory / CONFIG_FILE, {"kind": kind, "config": router.config()})
    return directory


def load_router(model: nn.Module, directory: str | Path, name: str) -> nn.Module:
    """Rebuild the router saved in ``directory``, load its tensors and register it on ``model`` as ``name``."""
    directory = Path(directory)
    meta = read_json(directory / CONFIG_FILE)
    if not isinstance(meta.get("config"), dict) or meta.get("kind") not in ROUTER_KINDS:
        raise AdapterFileError(f"{directory / CONFIG_FILE}: needs a 'kind' among {ROUTER_KINDS.names()} and a "
                               f"'config' object; got kind={meta.get('kind')!r}")
    try:
        router = ROUTER_KINDS.get(meta["kind"])(**meta["config"])
    except (TypeError, LorakitError) as err:
        raise AdapterFileError(f"{directory / CONFIG_FILE}: the config does not build a {meta['kind']!r} router: "
                               f"{err}") from None
    tensors, _ = read_safetensors(directory / WEIGHTS_FILE)
    expected = router.state_dict()
    wrong = sorted(set(expected) ^ set(tensors)) + sorted(
        k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if wrong:
        raise AdapterFileError(f"{directory / WEIGHTS_FILE}: tensors do not match the router its config builds "
                               f"(missing, unexpected or misshapen: {wrong[:5]})")
    with torch.no_grad():
        router.load_state_dict(tensors)
    first = next(model.parameters(), None)
    if first is not None:
        router.to(device=first.device)
    return add_router(model, name, router)
