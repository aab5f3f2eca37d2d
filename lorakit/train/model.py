"""Finding and loading the base model and its tokenizer: a transformers folder (a compressed one, written by
``lorakit compress``, too), a ``.gguf`` file (converted once into the cache) or, by default, the embedded SmolLM2."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compress.model import COMPRESSION_FILE, load_compressed
from .default import cache_dir, convert_gguf, default_model_dir
from .device import base_dtype, resolve_device
from .errors import DataError


def resolve_model(model: str | None) -> Path:
    """The transformers folder for ``--model`` (``None``: the embedded default)."""
    if model is None:
        return default_model_dir()
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        return convert_gguf(path, cache_dir() / "gguf" / f"{path.stem}-{path.stat().st_size}")
    if not (path / "config.json").is_file():
        raise DataError(f"--model {model}: not a transformers model folder (no config.json) nor a .gguf file; "
                        f"models cannot be downloaded here, give a local folder")
    return path


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str | None, dtype: torch.dtype = torch.float32, *, meta: bool = False,
               device: torch.device | str | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` in eval mode, on ``device`` (default: the CPU); ``meta=True`` builds the architecture
    without reading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = resolve_model(model)
    if (folder / COMPRESSION_FILE).is_file():  # low-rank factored layers (lorakit.compress)
        net = load_compressed(folder, dtype, meta=meta)
    elif meta:
        with torch.device("meta"):
            net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    else:
        net = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if device is not None and not meta:
        net.to(device)
    return net.eval(), load_tokenizer(folder)


def load_model_on(model: str | None, device: str, bf16: bool | None, *, place: bool = True) -> tuple[nn.Module, Any]:
    """:func:`load_model` for ``--device`` / ``--bf16``: the base in the dtype the device implies (see
    :func:`~lorakit.train.device.base_dtype`), placed on the device unless ``place`` is false (``--fsdp`` shards it
    there later)."""
    on = resolve_device(device)
    return load_model(model, base_dtype(on, bf16), device=on if place else None)
