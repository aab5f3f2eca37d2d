"""AirLLM's rank vectors (lorakit/rank/airllm.py): any policy's per-module ranks become adapters of exactly those
ranks, and the reported payload equals the bytes of the saved adapter's tensors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.hosts.host import adapters_named
from lorakit.rank.airllm import load_ranks, rank_vector, save_ranks, target_geometries

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama() -> nn.Module:
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config)


def by_size(path: str, d_in: int, d_out: int) -> int:
    """A policy: rank 0 on the key/value projections, otherwise growing with the layer index and the width."""
    if path.endswith(("k_proj", "v_proj")):
        return 0
    return 1 + int(path.split(".")[2]) + (d_in + d_out) // 32


def ranks_built(model: nn.Module, name: str) -> dict[str, int]:
    return {host.path: adapter.a.shape[0] for host, adapter in adapters_named(model, name)}


def saved_bytes(folder: Path) -> dict[str, int]:
    """Module path -> bytes of its tensors in the saved safetensors file."""
    out: dict[str, int] = {}
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            path = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            out[path] = out.get(path, 0) + tensor.numel() * tensor.element_size()
    return out


def test_callable_policy_builds_exactly_its_ranks_and_bytes_match_the_saved_file(tmp_path: Path) -> None:
    model = tiny_llama()
    vector = rank_vector(model, by_size)
    assert len(vector.ranks) == 14 and sum(r == 0 for r in vector.ranks.values()) == 4
    lorakit.adapt(model, vector.config(alpha=8.0), "air")
    assert ranks_built(model, "air") == {p: r for p, r in vector.ranks.items() if r > 0}
    geometries = target_geometries(model)
    expected = {p: r * (geometries[p].d_in + geometries[p].d_out) * 4 for p, r in vector.ranks.items() if r > 0}
    assert vector.module_bytes() == expected
    assert saved_bytes(lorakit.save_adapter(model, tmp_path / "air", "air")) == expected
    assert vector.total_bytes() == sum(expected.values())
    assert vector.total_bytes(torch.bfloat16) * 2 == vector.total_bytes(torch.float32)


def test_json_rank_file_round_trips_and_a_saved_adapter_reloads_with_its_ranks(tmp_path: Path) -> None:
    model = tiny_llama()
    ranks = rank_vector(model, by_size).ranks
    vector = rank_vector(model, save_ranks(ranks, tmp_path / "ranks.json"))
    assert vector.ranks == ranks == load_ranks(tmp_path / "ranks.json")
    lorakit.adapt(model, vector.config(init="random"), "air")
    folder = lorakit.save_adapter(model, tmp_path / "air", "air")
    other = tiny_llama()
    lorakit.load_adapter(other, folder, name="air")
    assert ranks_built(other, "air") == ranks_built(model, "air")


def test_a_short_path_does_not_shadow_a_longer_one_and_convolutions_count_their_kernel(tmp_path: Path) -> None:
    model = nn.Sequential()
    model.add_module("up", nn.Linear(6, 6))
    block = nn.Module()
    block.up = nn.Linear(6, 6)
    block.conv = nn.Conv2d(3, 5, 3)
    model.add_module("block", block)
    vector = rank_vector(model, {"up": 1, "block.up": 3, "block.conv": 2}, targets=["up", "conv"])
    lorakit.adapt(model, vector.config())
    assert ranks_built(model, "default") == {"up": 1, "block.up": 3, "block.conv": 2}
    assert vector.module_params()["block.conv"] == 2 * (3 * 9 + 5)
    assert saved_bytes(lorakit.save_adapter(model, tmp_path / "a")) == vector.module_bytes()


def test_bad_rank_vectors_are_refused_with_the_valid_module_paths(tmp_path: Path) -> None:
    model = tiny_llama()
    full = rank_vector(model, by_size).ranks
    with pytest.raises(lorakit.ConfigError, match=r"not targeted: \['model.layers.9.mlp'\].*valid module paths"):
        rank_vector(model, {**full, "model.layers.9.mlp": 2})
    missing = dict(full)
    del missing["model.layers.1.mlp.up_proj"]
    with pytest.raises(lorakit.ConfigError, match=r"no rank for the targeted modules \['model.layers.1.mlp.up_proj'\]"):
        rank_vector(model, missing)
    for bad in (-1, 2.0, True, "4"):
        with pytest.raises(lorakit.ConfigError, match="must be an integer >= 0"):
            rank_vector(model, lambda path, d_in, d_out, bad=bad: bad)
    with pytest.raises(lorakit.ConfigError, match="are all 0"):
        rank_vector(model, lambda *_: 0)
    with pytest.raises(lorakit.ConfigError, match="set by the rank vector"):
        rank_vector(model, by_size).config(r=4)
    with pytest.raises(lorakit.ConfigError, match="must be a callable"):
        rank_vector(model, 4)  # type: ignore[arg-type]
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    with pytest.raises(lorakit.ConfigError, match="JSON object"):
        rank_vector(model, tmp_path / "list.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(lorakit.ConfigError, match="cannot be read as JSON"):
        rank_vector(model, tmp_path / "broken.json")
