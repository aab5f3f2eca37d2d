"""Compress a whole model: each target ``nn.Linear`` becomes a :class:`FactoredLinear` where that saves parameters
(LORD, METHODS.md entry 67: ``k (m + n) < m n``; Greenformers' LRT, entry 68), and the compressed model saved and
loaded as a transformers folder.

The folder is what ``save_pretrained`` writes (``config.json``, the tokenizer, ``model.safetensors`` holding the
factors as ``<path>.down.weight`` / ``<path>.up.weight``) plus ``lorakit_compression.json`` listing each factored
layer and its rank; :func:`load_compressed` rebuilds the architecture from the config, swaps those layers and loads
every tensor strictly. ``lorakit.train.model.load_model`` recognises the folder, so ``lorakit finetune / eval /
serve --model FOLDER`` run on the compressed model.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..config import ALL_LINEAR, AdapterConfig
from ..errors import LorakitError, require
from ..hosts.host import HostLayer
from ..inject import _replace
from ..targeting import find_targets
from .decompose import DECOMPOSITIONS, LossFn, calibration_stats, decompose
from .factored import FactoredLinear, break_even

COMPRESSION_FILE = "lorakit_compression.json"
FORMAT_VERSION = 1


class CompressionFileError(LorakitError, ValueError):
    """A compressed-model folder is incomplete, or does not fit the architecture its config describes."""


@dataclass(frozen=True)
class LayerReport:
    """One factored layer: its rank ``k`` of ``full_rank``, parameters before / after, ``||W - UV||_F / ||W||_F``."""

    rank: int
    full_rank: int
    params_before: int
    params_after: int
    error: float


@dataclass
class CompressionReport:
    """What :func:`compress_model` did: factored layers, skipped layers with the reason, whole-model parameters."""

    method: str
    layers: dict[str, LayerReport] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def params_before(self) -> int:
        """Parameters of the factored layers before factoring."""
        return sum(r.params_before for r in self.layers.values())

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers.values())

    @property
    def ratio(self) -> float:
        """Whole-model parameters after / before."""
        return self.model_params_after / max(self.model_params_before, 1)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters once


def _planned_rank(linear: nn.Linear, rank_ratio: float | None) -> int | None:
    full = min(linear.in_features, linear.out_features)
    return None if rank_ratio is None else max(1, round(rank_ratio * full))


def _reason_to_skip(path: str, module: nn.Module, model: nn.Module, min_size: int,
                    rank: int | None) -> str | None:
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    if isinstance(parent, FactoredLinear):
        return "a factor of an already factored layer"
    if type(module) is not nn.Linear:
        return f"a {type(module).__name__}, not a dense nn.Linear"
    if module.weight.numel() < min_size:
        return f"{module.weight.numel()} weights < min_size {min_size}"
    limit = break_even(module.in_features, module.out_features)
    if rank is not None and rank >= limit:
        return f"rank {rank} saves nothing (factoring pays below rank {limit:.1f})"
    return None


def compress_model(model: nn.Module, rank_ratio: float | None = None, energy: float | None = None,
                   method: str = "svd", calibration: Iterable[Any] | None = None,
                   targets: str | Sequence[str] = ALL_LINEAR, exclude: str | Sequence[str] = (), min_size: int = 0,
                   loss: LossFn | None = None) -> CompressionReport:
    """Replace each target ``nn.Linear`` of ``model`` (in place) by a :class:`FactoredLinear` where it saves
    parameters; returns the :class:`CompressionReport`.

    Args:
        rank_ratio: ``k = round(rank_ratio * min(d_out, d_in))``, in ``(0, 1]``; or
        energy: the fewest directions holding this share of each (weighted) layer's squared norm, in ``(0, 1]``.
        method: ``"svd"``, ``"activation"`` (whitened by the inputs' Gram matrix, SVD-LLM) or ``"fisher"``
            (FWSVD); see :mod:`lorakit.compress.decompose`.
        calibration: input batches for ``activation`` / ``fisher`` (a mapping is called as ``model(**batch)``);
        loss: ``loss(model, batch) -> scalar`` for ``fisher`` (default: the output's ``.loss``).
        targets / exclude: :class:`~lorakit.AdapterConfig`'s rules; default every Linear except the output head.
        min_size: layers with fewer weights are left dense.
    """
    require((rank_ratio is None) != (energy is None), "rank_ratio / energy", (rank_ratio, energy), "give exactly one")
    require(rank_ratio is None or 0 < rank_ratio <= 1, "rank_ratio", rank_ratio, "must be in (0, 1]")
    require(method in DECOMPOSITIONS, "method", method, f"must be one of {', '.join(DECOMPOSITIONS)}")
    require((calibration is None) == (method == "svd"), "calibration", type(calibration).__name__,
            "method 'svd' takes none; 'activation' and 'fisher' need calibration batches")
    require(isinstance(min_size, int) and min_size >= 0, "min_size", min_size, "must be an integer >= 0")
    report = CompressionReport(method, model_params_before=_count(model))
    chosen: dict[str, nn.Linear] = {}
    for path, module in find_targets(model, AdapterConfig(targets=targets, exclude=exclude)):
        if isinstance(module, HostLayer):
            raise LorakitError(f"layer {path!r} hosts adapters; compress the model before adapting it")
        reason = _reason_to_skip(path, module, model, min_size, _planned_rank(module, rank_ratio))
        if reason is None:
            chosen[path] = module
        else:
            report.skipped[path] = reason
    stats = {} if calibration is None else calibration_stats(model, chosen, calibration, method, loss)
    for path, linear in chosen.items():
        factored = decompose(linear, _planned_rank(linear, rank_ratio), energy, method, stats.get(path))
        limit = break_even(linear.in_features, linear.out_features)
        if factored.rank >= limit:  # an energy share that keeps too many directions
            report.skipped[path] = (f"energy {energy} keeps rank {factored.rank}, saving nothing (factoring pays "
                                    f"below rank {limit:.1f})")
            continue
        with torch.no_grad():
            weight = linear.weight.float()
            error = float((factored.up.weight.float() @ factored.down.weight.float() - weight).norm()
                          / weight.norm().clamp_min(1e-30))
        before = sum(p.numel() for p in linear.parameters())
        report.layers[path] = LayerReport(factored.rank, min(linear.in_features, linear.out_features), before,
                                          factored.num_parameters, error)
        _replace(model, path, factored)
    report.model_params_after = _count(model)
    return report


def factored_layers(model: nn.Module) -> dict[str, FactoredLinear]:
    """Every :class:`FactoredLinear` of ``model`` by path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, FactoredLinear)}


def save_compressed(model: nn.Module, tokenizer: Any, folder: str | os.PathLike) -> Path:
    """Write ``model`` (``save_pretrained``), ``tokenizer`` (unless ``None``) and :data:`COMPRESSION_FILE` into
    ``folder``; returns its path."""
    hosted = [path for path, m in model.named_modules() if isinstance(m, HostLayer)]
    if hosted:
        raise LorakitError(f"layers {hosted[:3]} host adapters; merge and unload them (lorakit.unload) or save the "
                           "adapter separately before saving the compressed model")
    out = Path(folder)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    layers = {path: {"rank": m.rank, "bias": m.has_bias} for path, m in factored_layers(model).items()}
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{COMPRESSION_FILE}.")
    with os.fdopen(fd, "w") as handle:
        json.dump({"version": FORMAT_VERSION, "layers": layers}, handle, indent=1)
    os.replace(tmp, out / COMPRESSION_FILE)  # written last: a folder with it is complete
    return out


def _read_layers(folder: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((folder / COMPRESSION_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompressionFileError(f"{folder / COMPRESSION_FILE}: cannot read ({exc})") from exc
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict) or data.get("version") != FORMAT_VERSION or not all(
            isinstance(v, dict) and isinstance(v.get("rank"), int) and v["rank"] >= 1 and isinstance(v.get("bias"),
                                                                                                      bool)
            for v in layers.values()):
        raise CompressionFileError(f"{folder / COMPRESSION_FILE}: expected version {FORMAT_VERSION} and 'layers' "
                                   "mapping each path to {'rank': int >= 1, 'bias': bool}")
    return layers


def _load_tensors(net: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CompressionFileError(f"{folder}: no .safetensors weights")
    state = {k: v for f in files for k, v in load_file(f).items()}
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise CompressionFileError(f"{folder}: the weights do not fit the compressed architecture: {exc}") from exc
    loaded = {id(t) for name, t in (*net.named_parameters(remove_duplicate=False),
                                    *net.named_buffers(remove_duplicate=False)) if name in state}
    tensors = dict(net.state_dict(keep_vars=True))
    untied = [k for k in result.missing_keys if id(tensors[k]) not in loaded]  # tied weights come with their twin
    if result.unexpected_keys or untied:
        raise CompressionFileError(f"{folder}: the weights do not fit the compressed architecture; missing "
                                   f"{untied[:5]}, unexpected {result.unexpected_keys[:5]}")


def load_compressed(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, *, meta: bool = False,
                    ) -> nn.Module:
    """The model saved by :func:`save_compressed` (eval mode); ``meta=True`` builds it without reading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(folder)
    layers = _read_layers(path)
    with torch.device("meta" if meta else "cpu"), no_init_weights():
        net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
        net.tie_weights()  # no_init_weights skips the tying too
        for name, spec in layers.items():
            try:
                dense = net.get_submodule(name)
            except AttributeError:
                dense = None
            if type(dense) is not nn.Linear or (dense.bias is not None) != spec["bias"]:
                raise CompressionFileError(f"{path / COMPRESSION_FILE} lists {name!r} (bias={spec['bias']}), which "
                                           f"is not such an nn.Linear of this architecture")
            _replace(net, name, FactoredLinear(dense.in_features, dense.out_features, spec["rank"], spec["bias"],
                                               dtype=dtype))
    if not meta:
        _load_tensors(net, path)
    return net.eval()
