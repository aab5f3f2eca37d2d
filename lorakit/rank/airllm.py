"""Per-module rank vectors and their transmission cost (AirLLM, METHODS.md entry 32).

AirLLM sends a LoRA adapter over a wireless link and lets a policy choose each projection's rank: the action is a
vector ``r`` over every LoRA-inserted module, and the payload is ``sum_i r_i (d_in,i + d_out,i) * bytes_per_element``.
Whatever produces the vector (the paper's PPO + diffusion policy, a heuristic, a file), lorakit takes it from

- a callable ``policy(module_path, in_features, out_features) -> rank``, asked once per targeted module, or
- a mapping / JSON file ``{module_path: rank}`` that must name every targeted module and nothing else,

checks it (integer ranks >= 0; rank 0 leaves the module without an adapter) and turns it into a
:class:`~lorakit.LoraConfig` whose ``targets`` / ``rank_pattern`` give exactly those ranks, with the bytes an adapter
of that config holds, per module and in total. On a convolution ``in_features`` is its input channels and ``A``
holds ``r * d_in * prod(kernel)`` values, which the byte count follows (it is the size of the saved tensors).

    vector = rank_vector(model, lambda path, d_in, d_out: 8 if "q_proj" in path else 0)
    lorakit.adapt(model, vector.config(alpha=16))
    vector.total_bytes(torch.bfloat16)
"""
from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import nn

from ..config import ALL_LINEAR, AdapterConfig
from ..errors import ConfigError, require
from ..hosts.geometry import Geometry, geometry_of
from ..hosts.host import HostLayer
from ..methods.lora import LoraConfig
from ..targeting import find_targets

RankPolicy = Union[Callable[[str, int, int], int], Mapping[str, int], str, Path]
_SET_HERE = ("targets", "exclude", "r", "rank_pattern", "lora_bias")


def target_geometries(model: nn.Module, targets: str | Sequence[str] = ALL_LINEAR,
                      exclude: str | Sequence[str] = ()) -> dict[str, Geometry]:
    """Path -> :class:`~lorakit.hosts.geometry.Geometry` of every module ``targets`` / ``exclude`` select
    (:class:`~lorakit.AdapterConfig`'s rules), in model order."""
    found = find_targets(model, AdapterConfig(targets=targets, exclude=exclude))
    return {path: geometry_of(m.base_layer if isinstance(m, HostLayer) else m) for path, m in found}


def load_ranks(path: str | Path) -> dict[str, int]:
    """A JSON file holding one object ``{module_path: rank}`` (checked against a model by :func:`rank_vector`)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"rank file {str(path)!r} cannot be read as JSON: {exc}") from None
    require(isinstance(data, dict), "rank file", str(path), "must hold a JSON object {module_path: rank}")
    return data


def save_ranks(ranks: Mapping[str, int], path: str | Path) -> Path:
    """Write ``{module_path: rank}`` as the JSON file :func:`load_ranks` reads."""
    path = Path(path)
    path.write_text(json.dumps(dict(ranks), indent=1) + "\n")
    return path


def _check_rank(path: str, rank: Any) -> int:
    require(isinstance(rank, numbers.Integral) and not isinstance(rank, bool) and rank >= 0, f"rank of {path!r}",
            rank, "must be an integer >= 0 (0 leaves the module without an adapter)")
    return int(rank)


def _from_mapping(ranks: Mapping[str, Any], valid: Sequence[str]) -> dict[str, int]:
    unknown = sorted(set(ranks) - set(valid))
    if unknown:
        raise ConfigError(f"the rank vector names modules that are not targeted: {unknown}; "
                          f"valid module paths: {list(valid)}")
    missing = [p for p in valid if p not in ranks]
    if missing:
        raise ConfigError(f"the rank vector has no rank for the targeted modules {missing} (give 0 to leave one out); "
                          f"valid module paths: {list(valid)}")
    return {p: _check_rank(p, ranks[p]) for p in valid}


@dataclass(frozen=True)
class RankVector:
    """One rank per targeted module (0: no adapter there) with the modules' geometries."""

    ranks: dict[str, int]
    geometries: dict[str, Geometry]

    def __post_init__(self) -> None:
        require(set(self.ranks) == set(self.geometries), "ranks", sorted(self.ranks),
                "must name exactly the modules whose geometries are given")
        for path, rank in self.ranks.items():
            _check_rank(path, rank)
        require(any(self.ranks.values()), "ranks", self.ranks, "are all 0: no module would get an adapter")

    def module_params(self) -> dict[str, int]:
        """Path -> values in ``A`` and ``B`` at that module's rank: ``r (d_in + d_out)`` on a linear layer."""
        return {path: math.prod(g.down_shape(r)) + math.prod(g.up_shape(r))
                for path, g in self.geometries.items() if (r := self.ranks[path]) > 0}

    def module_bytes(self, dtype: torch.dtype = torch.float32) -> dict[str, int]:
        """Path -> bytes the module's factors take in ``dtype`` (modules of rank 0 send nothing and are absent)."""
        return {path: n * dtype.itemsize for path, n in self.module_params().items()}

    def total_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """``sum_i r_i (d_in,i + d_out,i) * bytes_per_element``: the adapter's payload."""
        return sum(self.module_bytes(dtype).values())

    def config(self, **options: Any) -> LoraConfig:
        """A :class:`~lorakit.LoraConfig` targeting exactly the modules of rank > 0, each at its rank (``r`` is the
        largest; ``rank_pattern`` lists every module, the most specific path first so no key shadows a longer one).
        ``options`` are LoRA's other fields (``alpha``, ``init``, ``dropout``, ...)."""
        clash = sorted(set(options) & set(_SET_HERE))
        require(not clash, "options", clash, f"are set by the rank vector; pass only LoRA's other fields, not "
                f"{', '.join(_SET_HERE)}")
        kept = sorted((p for p, r in self.ranks.items() if r > 0), key=lambda p: (-p.count("."), p))
        return LoraConfig(targets=tuple(kept), r=max(self.ranks.values()),
                          rank_pattern={re.escape(p): self.ranks[p] for p in kept}, **options)


def rank_vector(model: nn.Module, policy: RankPolicy, targets: str | Sequence[str] = ALL_LINEAR,
                exclude: str | Sequence[str] = ()) -> RankVector:
    """The checked rank vector ``policy`` gives the modules ``targets`` / ``exclude`` select.

    Args:
        policy: ``policy(module_path, in_features, out_features) -> rank``, a mapping ``{module_path: rank}`` or
            the path of a JSON file holding one (:func:`load_ranks`); a mapping must give every targeted module a
            rank and name no other module.
    """
    geometries = target_geometries(model, targets, exclude)
    if isinstance(policy, (str, Path)):
        policy = load_ranks(policy)
    if isinstance(policy, Mapping):
        ranks = _from_mapping(policy, list(geometries))
    elif callable(policy):
        ranks = {p: _check_rank(p, policy(p, g.d_in, g.d_out)) for p, g in geometries.items()}
    else:
        raise ConfigError(f"policy={policy!r} is invalid: must be a callable (path, in_features, out_features) -> "
                          "rank, a mapping {module_path: rank} or a JSON file path")
    return RankVector(ranks, geometries)
