"""Targeting rules, config validation and the registry."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import tiny_gpt2, tiny_llama

import lorakit
from lorakit.registry import Registry


def adapted_paths(model, name="default"):
    return sorted(h.path for h in lorakit.inject.hosts(model) if name in h.adapters)


def test_all_linear_covers_every_linear_but_the_output_head():
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig())
    linear = sorted(n for n, m in tiny_llama().named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    assert adapted_paths(model) == linear


def test_all_linear_takes_gpt2_conv1d():
    model = lorakit.adapt(tiny_gpt2(), lorakit.LoraConfig())
    assert "transformer.h.0.attn.c_attn" in adapted_paths(model)
    assert "lm_head" not in adapted_paths(model)


def test_names_match_whole_suffixes_only():
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(targets=["q_proj", "layers.1.mlp.up_proj"]))
    assert adapted_paths(model) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj",
    ]
    with pytest.raises(lorakit.TargetError, match="matched no adaptable module"):
        lorakit.adapt(tiny_llama(), lorakit.LoraConfig(targets=["_proj"]))


def test_regex_must_match_the_whole_name_and_exclude_applies():
    cfg = lorakit.LoraConfig(targets=r".*\.(q|v)_proj", exclude=["layers.0.self_attn.v_proj"])
    model = lorakit.adapt(tiny_llama(), cfg)
    assert adapted_paths(model) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]


def test_zero_matches_shows_real_module_names():
    with pytest.raises(lorakit.TargetError) as err:
        lorakit.adapt(tiny_llama(), lorakit.LoraConfig(targets=["query"]))
    assert "model.layers.0.self_attn.q_proj" in str(err.value)


def test_naming_a_container_is_an_error_naming_supported_layers():
    with pytest.raises(lorakit.TargetError, match="LlamaMLP.*supported layers: Linear"):
        lorakit.adapt(tiny_llama(), lorakit.LoraConfig(targets=["mlp"]))


def test_duplicate_adapter_name_is_an_error():
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig())
    with pytest.raises(lorakit.LorakitError, match="already exists"):
        lorakit.adapt(model, lorakit.LoraConfig(), "default")


def test_per_module_rank_and_alpha_patterns():
    cfg = lorakit.LoraConfig(r=8, alpha=16, rank_pattern={r"layers\.1\..*": 2}, alpha_pattern={"down_proj": 4})
    model = lorakit.adapt(tiny_llama(), cfg)
    layers = model.model.layers
    assert layers[0].self_attn.q_proj.adapters["default"].a.shape[0] == 8
    assert layers[1].self_attn.q_proj.adapters["default"].a.shape[0] == 2
    assert layers[0].mlp.down_proj.adapters["default"].scale == pytest.approx(4 / 8)
    assert layers[0].self_attn.q_proj.adapters["default"].scale == pytest.approx(16 / 8)


def test_rslora_scale():
    assert lorakit.LoraConfig(r=16, alpha=8, use_rslora=True).scale == pytest.approx(8 / 4)
    assert lorakit.LoraConfig(r=16, alpha=8).scale == pytest.approx(0.5)


@pytest.mark.parametrize("field,value,rule", [
    ("r", 0, "positive integer"), ("r", 2.5, "positive integer"), ("alpha", -1, "> 0"),
    ("dropout", 1.0, r"\[0, 1\)"), ("init", "xavier", "kaiming, gaussian, random"),
    ("rank_pattern", {"q": 0}, "positive integer"),
])
def test_config_errors_name_field_value_and_rule(field, value, rule):
    with pytest.raises(lorakit.ConfigError, match=rf"{field}.*{rule}"):
        lorakit.LoraConfig(**{field: value})


def test_configs_are_frozen():
    cfg = lorakit.LoraConfig(targets=["q_proj"])
    assert cfg.targets == ("q_proj",)
    with pytest.raises(AttributeError):
        cfg.r = 4  # type: ignore[misc]


def test_unknown_method_lists_the_available_ones():
    available = ", ".join(lorakit.METHODS.names())  # every registered method, sorted
    with pytest.raises(lorakit.ConfigError, match=f"unknown method 'loar'; available: {available}$"):
        lorakit.build_config("loar")


def test_registry_refuses_duplicates():
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(lorakit.ConfigError, match="already registered"):
        reg.register("a", 2)


def test_inspect_targets_is_a_dry_run():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = lorakit.inspect_targets(model, lorakit.LoraConfig(r=4, targets=["q_proj", "down_proj"]))
    assert [r.path for r in rows] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
    ]
    assert rows[0].trainable == 4 * (32 + 32) and rows[1].trainable == 4 * (64 + 32)
    assert not list(lorakit.inject.hosts(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
