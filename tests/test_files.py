"""Adapter files: bad, hostile and foreign input gets a clear error; writes are atomic."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from zoo import perturb, tiny_llama

import lorakit
from lorakit.io.adapter_files import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE


@pytest.fixture
def saved(tmp_path):
    """A saved adapter whose files the tests below damage one at a time; without lorakit's manifest (as PEFT writes
    it), which would catch every damage first (tested on its own)."""
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    perturb(model)
    lorakit.save_adapter(model, tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    return tmp_path


def test_saved_files_use_peft_names(saved):
    config = json.loads((saved / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]
    keys = load_file(saved / WEIGHTS_FILE).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * 2
    assert not [p for p in saved.iterdir() if p.name.endswith(".tmp")]


def test_pickle_files_are_refused(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    with pytest.raises(lorakit.AdapterFileError, match="pickle"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_corrupt_safetensors_is_a_clear_error(saved):
    (saved / WEIGHTS_FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(lorakit.AdapterFileError, match="not a valid safetensors file"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_invalid_json_config_is_a_clear_error(tmp_path):
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
              tmp_path / WEIGHTS_FILE)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(lorakit.AdapterFileError, match="not valid JSON"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_shape_mismatch_names_the_key_and_leaves_the_model_clean(saved):
    tensors = load_file(saved / WEIGHTS_FILE)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(8, 4)
    save_file(tensors, saved / WEIGHTS_FILE)
    model = tiny_llama()
    with pytest.raises(lorakit.AdapterFileError, match=rf"{key} has shape \(8, 4\), the model expects \(16, 4\)"):
        lorakit.load_adapter(model, saved)
    assert not list(lorakit.inject.hosts(model)) and not lorakit.configs(model)


def test_keys_for_modules_the_model_lacks_are_named(saved):
    tensors = load_file(saved / WEIGHTS_FILE)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, saved / WEIGHTS_FILE)
    with pytest.raises(lorakit.AdapterFileError, match="layers.7.*names no module"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_integer_tensors_are_refused(saved):
    tensors = load_file(saved / WEIGHTS_FILE)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 32, dtype=torch.int32)
    save_file(tensors, saved / WEIGHTS_FILE)
    with pytest.raises(lorakit.AdapterFileError, match="dtype torch.int32"):
        lorakit.load_adapter(tiny_llama(), saved)


def _peft_only(saved):
    """Drop lorakit's metadata so the loader must read PEFT's adapter_config.json."""
    save_file(load_file(saved / WEIGHTS_FILE), saved / WEIGHTS_FILE, metadata={"format": "pt"})


def test_unknown_peft_config_keys_warn(saved):
    _peft_only(saved)
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["some_future_option"] = 3
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="some_future_option"):
        lorakit.load_adapter(tiny_llama(), saved)


@pytest.mark.parametrize("key,value", [("peft_type", "IA3"), ("bias", "all")])
def test_peft_configs_we_cannot_honour_are_refused(saved, key, value):
    _peft_only(saved)
    config = json.loads((saved / CONFIG_FILE).read_text())
    config[key] = value
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(lorakit.AdapterFileError, match=key):
        lorakit.load_adapter(tiny_llama(), saved)


def test_a_config_naming_modules_to_save_whose_tensors_are_missing_is_refused(saved):
    """The file would load with the untrained original head: refused, naming the field."""
    _peft_only(saved)
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["modules_to_save"] = ["lm_head"]
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(lorakit.AdapterFileError, match="modules_to_save"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_lorakit_method_round_trips_through_metadata(tmp_path):
    model = lorakit.adapt(tiny_llama(), lorakit.LoraFAConfig(r=4, targets=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert isinstance(lorakit.configs(loaded)["default"], lorakit.LoraFAConfig)
    assert all(".lora_B." in k for k in lorakit.trainable_parameters(loaded))


def test_missing_directory_and_merged_save_are_errors(tmp_path):
    with pytest.raises(lorakit.AdapterFileError, match="not a directory"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "nope")
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(r=4))
    lorakit.merge(model)
    with pytest.raises(lorakit.LorakitError, match="unmerge before saving"):
        lorakit.save_adapter(model, tmp_path / "x")


def test_a_failed_write_leaves_the_previous_file_intact(saved, monkeypatch):
    before = (saved / WEIGHTS_FILE).read_bytes()
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"]))

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.io.files.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(model, saved)
    assert (saved / WEIGHTS_FILE).read_bytes() == before
    assert not [p for p in saved.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused_and_leave_the_model_clean(saved, bad):
    """Issue 14: a file with nan / inf factors loaded silently and poisoned every output."""
    tensors = load_file(saved / WEIGHTS_FILE)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key][0, 0] = bad
    save_file(tensors, saved / WEIGHTS_FILE)
    model = tiny_llama()
    with pytest.raises(lorakit.AdapterFileError, match="q_proj.lora_A.weight holds non-finite values"):
        lorakit.load_adapter(model, saved)
    assert not list(lorakit.inject.hosts(model)) and not lorakit.configs(model)


@pytest.mark.parametrize("key", ["(a+)+$", "(\\\\w*)*x", "x" * 1001, "q_proj("])
def test_hostile_rank_pattern_keys_in_a_file_are_refused(saved, key):
    """Issue 14: rank_pattern keys are regexes matched against every module name; a nested quantifier could hang the
    process, an invalid one failed deep inside ``re``."""
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["rank_pattern"] = {key: 2}
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    save_file(load_file(saved / WEIGHTS_FILE), saved / WEIGHTS_FILE)  # as PEFT writes it: the config is the JSON
    with pytest.raises((lorakit.AdapterFileError, lorakit.ConfigError), match="rank_pattern"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_adapters_of_deep_models_save_load_and_export(tmp_path):
    """Internal targets name every adapted layer: 40 layers x 7 projections is far beyond the 1000-character limit
    on user regexes, and must still load (a PEFT file listing the paths, or leaf names) and export."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def deep() -> LlamaForCausalLM:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=40,
                                            num_attention_heads=2, num_key_value_heads=2)).eval()

    model = deep()
    lorakit.adapt(model, lorakit.LoraConfig(r=2, targets="all-linear", exclude=("model.layers.0.mlp.up_proj",)))
    perturb(model)
    ids = torch.randint(0, 32, (1, 5))
    expected = model(ids).logits
    lorakit.save_adapter(model, tmp_path / "a")
    assert isinstance(json.loads((tmp_path / "a" / CONFIG_FILE).read_text())["target_modules"], list)
    fresh = deep()
    lorakit.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(ids).logits, expected)
    lorakit.export_lora(fresh, tmp_path / "b")
    again = deep()
    lorakit.load_adapter(again, tmp_path / "b")
    torch.testing.assert_close(again(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_hostile_rank_is_refused_before_anything_is_allocated(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    for hostile in ({"r": 10**9}, {"rank_pattern": {"q_proj": 10**8}}):
        (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, **hostile}))
        fresh = tiny_llama(0)
        with pytest.raises(lorakit.AdapterFileError, match="bound on ranks"):
            lorakit.load_adapter(fresh, tmp_path)
        assert not lorakit.configs(fresh)


def test_a_file_cannot_order_unbounded_svd_work(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_999999999999"}))
    with pytest.raises(lorakit.AdapterFileError, match="subspace iterations must be at most 1000"):
        lorakit.load_adapter(tiny_llama(0), tmp_path)
    with pytest.raises(lorakit.ConfigError, match="niter"):
        lorakit.adapt(tiny_llama(0), lorakit.LoraConfig(r=2, targets=["q_proj"], init="pissa",
                                                         init_options={"niter": 10**6}))


def test_atomic_writes_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    import os

    from lorakit.io import files

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    files.write_json(tmp_path / "a.json", {"x": 1})
    assert len(synced) == 2 and synced[0].startswith(str(tmp_path / ".a.json.")) and synced[1] == str(tmp_path)


def test_a_save_torn_between_its_two_files_is_detected(tmp_path):
    model = tiny_llama(0)
    lorakit.adapt(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    perturb(model)
    lorakit.save_adapter(model, tmp_path)
    old_config = (tmp_path / CONFIG_FILE).read_text()
    lorakit.adapt(model, lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"]), "other")
    lorakit.save_adapter(model, tmp_path / "new", "other")
    (tmp_path / WEIGHTS_FILE).write_bytes((tmp_path / "new" / WEIGHTS_FILE).read_bytes())  # crash after the weights
    assert (tmp_path / CONFIG_FILE).read_text() == old_config and (tmp_path / MANIFEST_FILE).is_file()
    with pytest.raises(lorakit.AdapterFileError, match="torn"):
        lorakit.load_adapter(tiny_llama(0), tmp_path)
    lorakit.load_adapter(tiny_llama(0), tmp_path / "new")  # a whole save loads
