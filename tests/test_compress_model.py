"""Whole-model compression (LORD, METHODS.md entry 67): which layers are factored, calibration for the data-aware
methods, saving / loading as a transformers folder through ``load_model``, fine-tuning it, and ``lorakit compress``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from test_cli import sentiment_rows, write_jsonl
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.cli.compress import compress_arguments, run_compress
from lorakit.compress import (
    COMPRESSION_FILE,
    CompressionFileError,
    FactoredLinear,
    break_even,
    compress_model,
    factored_layers,
    load_compressed,
    save_compressed,
)
from lorakit.errors import ConfigError, LorakitError
from lorakit.hosts.host import hosts
from lorakit.train.model import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 9, 12, 7, 3, 8]])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "sentiment.jsonl", sentiment_rows(80))


def test_layers_are_factored_exactly_where_the_rank_saves_parameters(model_dir: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(model_dir)
    linears = {p: (m.in_features, m.out_features) for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = compress_model(model, rank_ratio=0.5)
    assert "lm_head" not in report.layers and "lm_head" not in report.skipped and type(model.lm_head) is nn.Linear
    assert set(report.layers) | set(report.skipped) == set(linears) - {"lm_head"}
    for path, (d_in, d_out) in linears.items():
        k = round(0.5 * min(d_in, d_out))
        if path in report.layers:
            assert k < break_even(d_in, d_out) and report.layers[path].rank == k
            layer = model.get_submodule(path)
            assert isinstance(layer, FactoredLinear) and layer.rank == k
        elif path != "lm_head":
            assert k >= break_even(d_in, d_out) and "saves nothing" in report.skipped[path]
    assert any(p.endswith("q_proj") for p in report.skipped) and any(p.endswith("k_proj") for p in report.layers)
    assert report.model_params_after == sum(p.numel() for p in model.parameters()) < report.model_params_before
    assert report.model_params_before - report.model_params_after == report.params_before - report.params_after
    assert all(0 < r.error < 1 for r in report.layers.values())


def test_energy_one_factors_nothing_and_bad_requests_are_refused(model_dir: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(model_dir)
    report = compress_model(model, energy=1.0)  # full rank never saves parameters
    assert not report.layers and all("energy" in reason for reason in report.skipped.values())
    with pytest.raises(ConfigError, match="give exactly one"):
        compress_model(model, rank_ratio=0.5, energy=0.9)
    with pytest.raises(ConfigError, match="calibration"):
        compress_model(model, rank_ratio=0.5, method="activation")
    with pytest.raises(ConfigError, match="rank_ratio"):
        compress_model(model, rank_ratio=1.5)
    lorakit.adapt(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    with pytest.raises(LorakitError, match="compress the model before adapting"):
        compress_model(model, rank_ratio=0.25)


class Scaled(nn.Module):
    """A linear layer fed features of very unequal scales (activation outliers)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.logspace(-2, 2, 32))
        self.proj = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x * self.scale)


def test_calibrated_methods_beat_svd_on_what_they_measure() -> None:
    torch.manual_seed(0)
    dense = Scaled()
    weights = torch.logspace(-2, 2, 32)[torch.randperm(32)]  # how much each output unit matters to the loss
    with torch.no_grad():
        batches = [(x, dense(x) + 0.1 * torch.randn(16, 32)) for x in torch.randn(6, 16, 32)]  # near its optimum

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return ((model(batch[0]) - batch[1]) * weights).pow(2).sum()

    def compressed(method: str) -> nn.Module:
        model = Scaled()
        model.load_state_dict(dense.state_dict())
        model.proj.weight.requires_grad_(False)
        compress_model(model, rank_ratio=0.25, method=method, calibration=None if method == "svd" else
                       iter([x for x, _ in batches] if method == "activation" else batches), loss=loss)
        assert isinstance(model.proj, FactoredLinear) and not model.proj.up.weight.requires_grad
        assert model.training  # calibration ran in eval mode, then restored the mode and requires_grad
        return model

    with torch.no_grad():
        held_out = torch.randn(64, 32)
        output_error = {m: float((compressed(m)(held_out) - dense(held_out)).norm()) for m in ("svd", "activation")}
        loss_increase = {m: sum(float(loss(compressed(m), b) - loss(dense, b)) for b in batches)
                         for m in ("svd", "fisher")}
    assert output_error["activation"] < 0.5 * output_error["svd"]
    assert 0 < loss_increase["fisher"] < 0.5 * loss_increase["svd"]


def test_tied_embeddings_stay_tied_through_save_and_load(tmp_path: Path) -> None:
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    compress_model(model, rank_ratio=0.25)
    loaded = load_compressed(save_compressed(model, None, tmp_path / "tied"))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


@pytest.fixture(scope="module")
def compressed_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    model, tokenizer = load_model(str(model_dir))
    compress_model(model, rank_ratio=0.25)
    out = save_compressed(model, tokenizer, tmp_path_factory.mktemp("compressed") / "model")
    with torch.no_grad():
        return out, model(IDS).logits


def test_saved_folder_loads_through_load_model_with_equal_logits(compressed_dir: tuple[Path, torch.Tensor]) -> None:
    folder, logits = compressed_dir
    listed = json.loads((folder / COMPRESSION_FILE).read_text())["layers"]
    loaded, tokenizer = load_model(str(folder))
    assert set(factored_layers(loaded)) == set(listed) and tokenizer.pad_token is not None
    assert {p: m.rank for p, m in factored_layers(loaded).items()} == {p: v["rank"] for p, v in listed.items()}
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, logits, rtol=0, atol=0)
    meta, _ = load_model(str(folder), meta=True)
    assert set(factored_layers(meta)) == set(listed) and meta.lm_head.weight.is_meta


def test_a_folder_that_does_not_fit_is_refused(compressed_dir: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    folder, _ = compressed_dir
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    path, spec = next(iter(json.loads((folder / COMPRESSION_FILE).read_text())["layers"].items()))
    (tmp_path / COMPRESSION_FILE).write_text(json.dumps({"version": 1, "layers": {path: {**spec, "rank": 3}}}))
    with pytest.raises(CompressionFileError, match="do not fit"):
        load_compressed(tmp_path)
    (tmp_path / COMPRESSION_FILE).write_text(json.dumps({"version": 1, "layers": {"model.nope": spec}}))
    with pytest.raises(CompressionFileError, match="model.nope"):
        load_compressed(tmp_path)


def test_finetune_runs_on_the_compressed_folder(compressed_dir: tuple[Path, torch.Tensor], data: Path,
                                                tmp_path: Path) -> None:
    folder, _ = compressed_dir
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(folder), "--data", str(data), "--task", "classification",
                 "--eval-size", "16", "--steps", "2", "--output", str(out)]) == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
    model, _ = load_model(str(folder))
    lorakit.load_adapter(model, out)
    assert {h.path.rpartition(".")[2] for h in hosts(model)} >= {"up", "down"}


def test_full_fine_tuning_of_a_compressed_folder_saves_a_compressed_folder(
        compressed_dir: tuple[Path, torch.Tensor], data: Path, tmp_path: Path) -> None:
    folder, logits = compressed_dir
    out = tmp_path / "full"
    assert main(["finetune", "--model", str(folder), "--data", str(data), "--task", "classification", "--method",
                 "full", "--lr", "1e-3", "--eval-size", "16", "--steps", "2", "--output", str(out)]) == 0
    assert json.loads((out / COMPRESSION_FILE).read_text()) == json.loads((folder / COMPRESSION_FILE).read_text())
    tuned, _ = load_model(str(out))  # trained in factored form, loaded back as factored layers
    assert set(factored_layers(tuned)) == set(json.loads((folder / COMPRESSION_FILE).read_text())["layers"])
    with torch.no_grad():
        assert not torch.allclose(tuned(IDS).logits, logits)


def test_the_server_serves_a_compressed_folder_as_generate_does(compressed_dir: tuple[Path, torch.Tensor]) -> None:
    from fastapi.testclient import TestClient

    from lorakit.serve.engine import Engine
    from lorakit.serve.server import create_app

    model, tokenizer = load_model(str(compressed_dir[0]))  # what `lorakit serve --model FOLDER` loads
    ids = tokenizer("the day was", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = tokenizer.decode(model.generate(ids, max_new_tokens=3, do_sample=False,
                                                   pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:])
    with TestClient(create_app(Engine(model, tokenizer), "base")) as client:
        reply = client.post("/v1/completions", json={"model": "base", "prompt": "the day was", "max_tokens": 3,
                                                     "temperature": 0})
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == expected


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    compress_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("method", ["svd", "fisher"])
def test_compress_command_prints_layers_and_totals_and_saves(model_dir: Path, data: Path, tmp_path: Path,
                                                            method: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = parse("--model", str(model_dir), "--rank-ratio", "0.25", "--method", method, "--data", str(data),
                 "--task", "classification", "--calibration-batches", "2", "--batch-size", "4", "--output", str(out))
    assert run_compress(args) == 0
    text = capsys.readouterr().out
    model, _ = load_model(str(out))
    layers = factored_layers(model)
    before = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(model_dir).parameters())
    after = sum(p.numel() for p in model.parameters())
    assert f"{len(layers)} layers factored by {method!r}" in text and f"model {before:,} -> {after:,}" in text
    assert all(path in text for path in layers) and "skipped" in text
