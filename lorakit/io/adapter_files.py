"""Save and load adapters in PEFT's on-disk format.

A directory holds ``adapter_config.json`` (PEFT's config fields for methods PEFT has) and
``adapter_model.safetensors`` with PEFT's keys, ``base_model.model.<module path>.<tensor>`` (e.g.
``...q_proj.lora_A.weight``, ``...q_proj.lora_magnitude_vector``). The safetensors metadata also records the
lorakit method and its full config, so lorakit-only details (e.g. LoRA-FA's frozen ``A``) round-trip. A config class
whose field was added with a default other than what older files meant declares ``FILE_DEFAULTS`` (field -> value),
used for files that omit the field (Compacter's and MoSA's ``form``: files from before it existed are the parallel
form, not today's default).

An adapter's copies of its modules to save (``modules_to_save``, :mod:`lorakit.modules_to_save`) are stored under
PEFT's keys, ``base_model.model.<module path>.<tensor>`` (no adapter name), and the config's ``modules_to_save``
field lists them. State shared by all layers of an adapter (:class:`~lorakit.methods.base.SharedState`) is stored
once, under ``lorakit_shared.<tensor>``; a PEFT format whose file lays such tensors out differently translates the keys
(:class:`~lorakit.io.peft_format.PeftFormat`). The PEFT formats are one table, keyed by ``peft_type``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import AdapterFileError, LorakitError
from ..hosts.geometry import is_supported, is_transposed
from ..hosts.host import adapters_named
from ..inject import SHARED, adapt, config_of, configs, delete_adapter, shared_states
from ..methods.base import METHODS
from ..modules_to_save import resolve, saved_modules
from ..targeting import candidate_modules
from . import peft_lokr, peft_lora, peft_miss, peft_randlora
from .files import PICKLE_SUFFIXES, read_json, read_safetensors, write_json, write_safetensors
from .peft_format import PeftFormat, common_fields

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MIN_RANK_BOUND = 4096  # ranks a file may ask for even on a narrow model
MANIFEST_FILE = "lorakit_manifest.json"  # digests of the two files, written after them (a torn save is detected)
PREFIX = "base_model.model."
SHARED_PREFIX = f"{SHARED}."
FORMATS: dict[str, PeftFormat] = {
    f.peft_type: f for f in (peft_lora.FORMAT, peft_lokr.FORMAT, peft_miss.FORMAT, peft_randlora.FORMAT)
}


def peft_format(config: AdapterConfig) -> PeftFormat | None:
    """The PEFT format ``config`` is written in, or ``None`` when PEFT has no such method."""
    return next((f for f in FORMATS.values() if type(config) in f.configs), None)


def _state(model: nn.Module, name: str, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for host, adapter in adapters_named(model, name):
        for key, value in adapter.state_dict(keep_vars=keep_vars).items():
            out[f"{PREFIX}{host.path}.{key}"] = value
    shared = shared_states(model).get(name)
    if shared is not None:
        for key, value in shared.state_dict(keep_vars=keep_vars).items():
            out[f"{SHARED_PREFIX}{key}"] = value
    for wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[name].state_dict(keep_vars=keep_vars).items():
                out[f"{PREFIX}{wrapper.path}.{key}"] = value
    return out


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """lorakit-keyed state of adapter ``name``: ``base_model.model.<path>.<tensor>`` per layer and per module to save
    (PEFT's keys) and ``lorakit_shared.<tensor>`` for state shared by all layers."""
    return _state(model, name)


def _check_sizes(model: nn.Module, config: AdapterConfig, source: Path) -> None:
    """Refuse ranks beyond the model's widest dimension before anything is allocated from them (a file's config is
    untrusted: ``r = 10**9`` would allocate before the tensors' shapes are compared)."""
    widest = max((max(p.shape[0], p.numel() // max(p.shape[0], 1)) for p in model.parameters() if p.dim()),
                 default=0)  # a layer's output units or inputs per unit (a convolution's channels x kernel)
    bound = max(widest, MIN_RANK_BOUND)  # RandLoRA's bases may exceed a small layer's width; sizes stay small
    sizes = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
             if f.name == "r" or f.name.endswith(("_r", "_rank"))}
    sizes.update({f"rank_pattern[{k!r}]": v for k, v in dict(getattr(config, "rank_pattern", {}) or {}).items()})
    too_big = {k: v for k, v in sizes.items() if isinstance(v, int) and v > bound}
    if too_big:
        raise AdapterFileError(f"{source}: {too_big} exceed the bound on ranks ({bound}: the model's widest dimension, "
                               f"at least {MIN_RANK_BOUND}); the adapter is refused before anything is allocated")


def _target_modules(model: nn.Module, paths: list[str]) -> list[str] | str:
    """PEFT ``target_modules`` selecting exactly ``paths``: leaf names when they are unambiguous, else the paths."""
    leaves = {p.rsplit(".", 1)[-1] for p in paths}
    chosen = set(paths)
    same_leaf = {p for p, _ in candidate_modules(model) if p and p.rsplit(".", 1)[-1] in leaves}
    if same_leaf == chosen:
        return sorted(leaves)
    return sorted(paths)  # full paths: PEFT's and lorakit's list rule match each exactly (no regex length limit)


def reproducible_from_file(model: nn.Module, name: str = "default") -> bool:
    """Whether adapter ``name``'s own tensors on the stock base reproduce it (not so when its initialiser rewrote
    the base weights from data, e.g. LoRA-GA: use :func:`lorakit.export_lora` for those)."""
    return all(adapter.reproducible_from_file for _, adapter in adapters_named(model, name))


def save_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> Path:
    """Write adapter ``name`` of ``model`` to ``directory`` in PEFT's format (atomic writes)."""
    config = config_of(model, name)
    layers = [h for h, _ in adapters_named(model, name)]
    if not reproducible_from_file(model, name):
        raise LorakitError(
            f"adapter {name!r} was initialised from data ({config.init!r}) by rewriting the base weights, which a "
            "file cannot reproduce on the stock model; save it with lorakit.export_lora(model, directory, name)"
        )
    if any(name in h.merged for h in layers):
        raise LorakitError(f"adapter {name!r} is merged; unmerge before saving so the file holds its own tensors")
    directory = Path(directory)
    metadata = {"format": "pt", "lorakit_method": config.method, "lorakit_config": json.dumps(config.to_dict())}
    tensors, fmt = adapter_tensors(model, name), peft_format(config)
    if fmt is None:
        peft = {"peft_type": None, "lorakit_method": config.method, **config.to_dict()}
    else:
        base_name = getattr(getattr(model, "config", None), "name_or_path", None) or None
        peft = {**common_fields(fmt.peft_type, _target_modules(model, [h.path for h in layers]), base_name,
                                list(config.modules_to_save)),
                **fmt.to_peft(config, any(is_transposed(h.base_layer) for h in layers))}
        saved = _saved_keys(model, config, tensors)
        tensors = {**fmt.to_file({k: v for k, v in tensors.items() if k not in saved}, config), **saved}
    write_safetensors(directory / WEIGHTS_FILE, tensors, metadata)
    write_json(directory / CONFIG_FILE, peft)
    write_json(directory / MANIFEST_FILE, {"files": {f: file_digest(directory / f) for f in (WEIGHTS_FILE,
                                                                                              CONFIG_FILE)}})
    return directory


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_manifest(directory: Path) -> None:
    """A folder lorakit saved carries the digests of its two files, written after them: a save torn between the
    two writes (or a file changed since) no longer matches and is refused. Folders without one (PEFT's) pass."""
    if not (directory / MANIFEST_FILE).is_file():
        return
    files = read_json(directory / MANIFEST_FILE).get("files")
    if not isinstance(files, dict):
        raise AdapterFileError(f"{directory / MANIFEST_FILE}: needs a 'files' object of digests")
    for name, digest in files.items():
        if name not in (WEIGHTS_FILE, CONFIG_FILE) or not (directory / name).is_file() \
                or file_digest(directory / name) != digest:
            raise AdapterFileError(f"{directory / name} does not match the manifest saved with it: the save was "
                                   f"torn or the file changed since; save the adapter again")


def _config_from_files(directory: Path, metadata: dict[str, str]) -> AdapterConfig:
    if "lorakit_method" in metadata:
        _, config_cls = METHODS.get(metadata["lorakit_method"])
        # a field the file omits takes the value files meant before it existed, when that differs from its default
        fields = {**getattr(config_cls, "FILE_DEFAULTS", {}), **json.loads(metadata.get("lorakit_config", "{}"))}
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            warnings.warn(f"{directory}: ignoring unknown {config_cls.__name__} fields {unknown}", stacklevel=3)
        return config_cls(**{k: v for k, v in fields.items() if k in known})
    source = directory / CONFIG_FILE
    data = read_json(source)
    fmt = FORMATS.get(data.get("peft_type"))
    if fmt is None:
        raise AdapterFileError(f"{source}: peft_type={data.get('peft_type')!r} is not supported; "
                               f"lorakit reads {', '.join(FORMATS)}")
    config = fmt.from_peft(data, str(source))
    to_save = data.get("modules_to_save")
    if not to_save:
        return config
    if not (isinstance(to_save, list) and all(isinstance(n, str) and n for n in to_save)):
        raise AdapterFileError(f"{source}: modules_to_save={to_save!r} must be a list of module names")
    return config.replace(modules_to_save=tuple(to_save))


def _saved_keys(model: nn.Module, config: AdapterConfig, tensors: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``tensors`` (lorakit / PEFT keys) that belong to the modules ``config.modules_to_save`` names
    on ``model``; each of those modules must have some."""
    if not config.modules_to_save:
        return {}
    prefixes = [f"{PREFIX}{path}." for path, _ in resolve(model, config.modules_to_save)]
    empty = [p[len(PREFIX):-1] for p in prefixes if not any(k.startswith(p) for k in tensors)]
    if empty:
        raise LorakitError(f"modules_to_save names {empty} on this model, but no tensor of theirs was given")
    return {k: v for k, v in tensors.items() if k.startswith(tuple(prefixes))}


def _module_paths(tensors: dict[str, Any], directory: Path, model: nn.Module) -> list[str]:
    """Module paths named by the file's keys, checked against the model."""
    present = {p for p, m in candidate_modules(model) if p and is_supported(getattr(m, "base_layer", m))}
    paths: dict[str, None] = {}
    for key in tensors:
        if key.startswith(SHARED_PREFIX):
            continue
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{directory / WEIGHTS_FILE}: key {key!r} does not start with {PREFIX!r}")
        rest = key[len(PREFIX):]
        path = next((p for p in _prefixes(rest) if p in present), None)
        if path is None:
            raise AdapterFileError(f"{directory / WEIGHTS_FILE}: key {key!r} names no module of this model")
        paths[path] = None
    if not paths:
        raise AdapterFileError(f"{directory / WEIGHTS_FILE} holds no tensors")
    return list(paths)


def _prefixes(key: str) -> list[str]:
    """``a.b.c.lora_A.weight`` -> ``["a.b.c.lora_A", "a.b.c", "a.b", "a"]`` (longest first, drop the leaf)."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def read_adapter(directory: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Config and lorakit-keyed tensors of a PEFT-format adapter directory, read once into host memory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory} is not a directory holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    if not (directory / WEIGHTS_FILE).exists():
        pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = f"; found pickle files {pickles}, which lorakit refuses to read" if pickles else ""
        raise AdapterFileError(f"{directory} has no {WEIGHTS_FILE}{hint}")
    check_manifest(directory)
    tensors, metadata = read_safetensors(directory / WEIGHTS_FILE)
    config = _config_from_files(directory, metadata)
    fmt = peft_format(config)
    return config, (tensors if fmt is None else fmt.from_file(tensors, config))


def attach_adapter(model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor], name: str,
                   source: str | Path, *, activate: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Add adapter ``name`` built from ``config`` and filled with :func:`read_adapter`'s ``tensors`` (copied);
    ``source`` names the directory in error messages. On any error the model is left without ``name``."""
    source = Path(source)
    try:
        saved = _saved_keys(model, config, tensors)
    except LorakitError as exc:
        raise AdapterFileError(f"{source}: {exc}") from None
    paths = _module_paths({k: v for k, v in tensors.items() if k not in saved}, source, model)
    _check_sizes(model, config, source)
    adapt(model, config.replace(targets=tuple(paths), exclude=()), name, activate=activate, dtype=dtype)
    try:
        _fill(model, name, tensors, source / WEIGHTS_FILE)
    except BaseException:
        delete_adapter(model, name)
        raise
    configs(model)[name] = config
    return model


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default", *, activate: bool = True,
                 dtype: torch.dtype | None = None) -> nn.Module:
    """Load a PEFT-format adapter directory (from lorakit or PEFT) into ``model`` as adapter ``name``."""
    config, tensors = read_adapter(directory)
    return attach_adapter(model, config, tensors, name, directory, activate=activate, dtype=dtype)


def _fill(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: Path) -> None:
    expected = _state(model, name, keep_vars=True)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(f"{source}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    with torch.no_grad():
        for key, param in expected.items():
            value = tensors[key]
            if value.shape != param.shape:
                raise AdapterFileError(
                    f"{source}: {key} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}"
                )
            if value.is_floating_point() != param.is_floating_point():  # integer buffers: e.g. MoS's shard indices
                raise AdapterFileError(f"{source}: {key} has dtype {value.dtype}; the model expects {param.dtype}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise AdapterFileError(f"{source}: {key} holds non-finite values (nan or inf); the file is corrupt")
            param.copy_(value.to(param.dtype))
