"""Safe file primitives: atomic writes and safetensors reads that refuse pickles and corrupt files."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import AdapterFileError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, flush it to disk, rename it onto ``path`` and flush the folder: readers never see a
    half-written file, and after a power loss the file is either the old one or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data to disk (folders: their entries, e.g. a rename; not on Windows)."""
    if os.name == "nt" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise AdapterFileError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; pickle files and corrupt headers are refused."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise AdapterFileError(f"{path} is a pickle file; lorakit only reads safetensors (pickles can run code)")
    if not path.is_file():
        raise AdapterFileError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises several error types for corrupt files
        raise AdapterFileError(f"{path} is not a valid safetensors file: {exc}") from None
    return tensors, metadata


def resolve_inside(path: str | os.PathLike, allowed_dir: str | os.PathLike | None) -> Path:
    """``path`` resolved (``~``, ``..`` and symlinks followed); with ``allowed_dir`` a relative path is taken relative
    to it and a path outside it is refused. Invalid paths (empty, not a path, a NUL byte) are refused too."""
    if not isinstance(path, (str, os.PathLike)) or not str(path) or "\x00" in str(path):
        raise AdapterFileError(f"adapter path {path!r} is invalid: give a folder path")
    if allowed_dir is None:
        return Path(path).expanduser().resolve()
    root = Path(allowed_dir).expanduser().resolve()
    resolved = (root / Path(path).expanduser()).resolve()
    if not resolved.is_relative_to(root):
        raise AdapterFileError(f"adapter path {str(path)!r} is outside the allowed directory {str(root)!r}")
    return resolved
