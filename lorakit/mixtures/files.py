"""Experts from files, and a whole mixture (router + experts) in one folder.

    lorakit.mixtures.load_experts(model, {"math": "adapters/math", "code": "adapters/code"})   # frozen experts
    lorakit.mixtures.save_mixture(model, "out/moe", "moe")    # mixture.json + router/ + experts/<name>/
    lorakit.mixtures.load_mixture(fresh_model, "out/moe")     # the same mixture, identical outputs

Experts are ordinary adapter folders in PEFT's format (made by PEFT or lorakit; an FFN expert of an
:class:`~lorakit.mixtures.block.ExpertBlock` is saved with the stock model's layer names, so each is also a plain
LoRA of the stock model). ``mixture.json`` names the router, its experts in routing order, whether they are frozen,
and for FFN expert blocks the block name and dispatch, so loading rebuilds the blocks around the loaded experts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Mapping, Sequence

from torch import nn

from ..errors import AdapterFileError, LorakitError
from ..hosts.host import hosts
from ..inject import _replace, routers
from ..io.adapter_files import load_adapter, save_adapter
from ..io.files import read_json, write_json
from ..io.routers import load_router, save_router
from .block import ExpertBlock, expert_blocks

MIXTURE_FILE, FORMAT = "mixture.json", "lorakit-mixture/1"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Mixture:
    """What a mixture folder holds: router ``router`` over experts ``experts`` (in routing order)."""

    router: str
    experts: tuple[str, ...]
    frozen: bool
    blocks: str | None = None  # module name of FFN expert blocks (MixLoRA), None for layer-level routing
    dispatch: str = "sparse"


def load_experts(model: nn.Module, folders: Mapping[str, str | Path], frozen: bool = True) -> list[str]:
    """Load each adapter folder as expert ``name`` (not active: a router or :func:`lorakit.mix` weighs them);
    ``frozen``: their tensors stop requiring grad, so router-only training leaves them bit-identical."""
    if not folders:
        raise LorakitError("give at least one expert folder, as {name: folder}")
    for name, folder in folders.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise LorakitError(f"expert name {name!r} must be a Python identifier")
        load_adapter(model, folder, name, activate=False)
        if frozen:
            freeze(model, [name])
    return list(folders)


def freeze(model: nn.Module, names: Sequence[str]) -> None:
    """Make adapters ``names`` frozen (``Adapter.frozen``): they stay in the forward and train nothing."""
    for host in hosts(model):
        for name in names:
            if name in host.adapters:
                host.adapters[name].frozen = True
                host.adapters[name].requires_grad_(False)


def save_mixture(model: nn.Module, directory: str | Path, router: str, experts: Sequence[str] | None = None) -> Path:
    """Write router ``router``, its experts and ``mixture.json`` to ``directory``. ``experts``: the adapters it
    weighs, in routing order (default: those of the expert blocks that use it, or the X-LoRA head's)."""
    if router not in routers(model):
        raise LorakitError(f"unknown router {router!r}; this model has: {sorted(routers(model)) or 'none'}")
    blocks = [b for b in expert_blocks(model) if b.router is routers(model)[router]]
    if experts is None:  # the largest block's experts, or those the router (an X-LoRA head) names
        experts = max((b.experts for b in blocks), key=len) if blocks else getattr(routers(model)[router],
                                                                                   "experts", None)
        if experts is None:
            raise LorakitError(f"router {router!r} does not name its experts; give them (in routing order)")
    directory = Path(directory)
    for name in experts:
        save_adapter(model, directory / "experts" / name, name)
    save_router(model, directory / "router", router)
    frozen = all(h.adapters[n].frozen for h in hosts(model) for n in experts if n in h.adapters)
    write_json(directory / MIXTURE_FILE, {
        "format": FORMAT, "router": router, "experts": list(experts), "frozen": frozen,
        "blocks": blocks[0].path.rpartition(".")[2] if blocks else None,
        "dispatch": blocks[0].dispatch if blocks else "sparse"})
    return directory


def read_mixture(directory: str | Path) -> Mixture:
    """Parse and check ``mixture.json``."""
    path = Path(directory) / MIXTURE_FILE
    meta = read_json(path)
    experts = meta.get("experts")
    if meta.get("format") != FORMAT or not isinstance(meta.get("router"), str) or not isinstance(experts, list) \
            or not experts or not all(isinstance(e, str) and _NAME.fullmatch(e) for e in experts):
        raise AdapterFileError(f"{path}: not a lorakit mixture (needs format {FORMAT!r}, a router name and a "
                               f"non-empty list of expert names that are identifiers)")
    blocks = meta.get("blocks")
    if blocks is not None and not (isinstance(blocks, str) and _NAME.fullmatch(blocks)):
        raise AdapterFileError(f"{path}: 'blocks' must be a module name or null, got {blocks!r}")
    return Mixture(meta["router"], tuple(experts), bool(meta.get("frozen", True)), blocks,
                   meta.get("dispatch", "sparse"))


def load_mixture(model: nn.Module, directory: str | Path) -> Mixture:
    """Load the mixture saved in ``directory`` into ``model`` (a stock model): experts, router, expert blocks."""
    directory = Path(directory)
    mixture = read_mixture(directory)
    load_experts(model, {name: directory / "experts" / name for name in mixture.experts}, frozen=mixture.frozen)
    router = load_router(model, directory / "router", mixture.router)
    if mixture.blocks is not None:
        for path, block in [(p, m) for p, m in model.named_modules() if p.rpartition(".")[2] == mixture.blocks]:
            held = {n for h in hosts(block) for n in h.adapters}
            count = len(list(takewhile(held.__contains__, mixture.experts)))  # MoLA: a prefix per block
            if count:
                _replace(model, path, ExpertBlock(block, path, mixture.experts[:count], router, mixture.dispatch))
    return mixture

