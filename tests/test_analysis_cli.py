"""lorakit.cli.inspect_analysis: the per-layer table of ``lorakit inspect --spectrum`` on saved model folders."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import lorakit
from lorakit.analysis import effective_rank, intruder_dimensions
from lorakit.cli.inspect_analysis import add_analysis_args, run_analysis
from lorakit.errors import LorakitError
from lorakit.train.model import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    add_analysis_args(parser)
    return parser.parse_args(list(argv))


def _table(out: str) -> dict[str, list[str]]:
    """layer path -> its cells, from the printed table."""
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("model.")}


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, float]]:
    """Two saved LoRA adapters on the tiny model, and the reference effective rank of each layer of the first."""
    folder = tmp_path_factory.mktemp("adapters")
    model, _ = load_model(str(model_dir))
    torch.manual_seed(0)
    for name in ("a", "b"):
        lorakit.adapt(model, lorakit.LoraConfig(r=2, alpha=4.0, targets=["q_proj", "v_proj"], init="random"), name)
        lorakit.save_adapter(model, folder / name, name)
    ranks = {}
    for host in lorakit.inject.hosts(model):
        s = torch.linalg.svdvals(host.adapters["a"].delta_weight(host.backend).double())
        ranks[host.path] = effective_rank(s[:2])  # the rest are rounding noise of the dense product
    return folder / "a", folder / "b", ranks


def test_the_table_gives_each_layer_s_effective_rank_intruders_and_similarity(
        model_dir: Path, adapters: tuple[Path, Path, dict[str, float]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    a, b, ranks = adapters
    png = tmp_path / "spectra.png"
    assert run_analysis(_args("--model", str(model_dir), "--spectrum", str(a), "--compare", str(a), "--intruders",
                              "--k", "2", "--plot", str(png))) == 0
    table = _table(capsys.readouterr().out)
    assert set(table) == set(ranks) and len(table) == 4
    for path, (erank, norm, intruders, similarity) in table.items():
        assert float(erank) == pytest.approx(ranks[path], abs=0.01)
        assert float(norm) > 0 and int(intruders) >= 0
        assert similarity == "1.000"  # an adapter shares its whole subspace with itself
    assert png.exists() and (tmp_path / "spectra-intruders.png").exists()
    assert run_analysis(_args("--model", str(model_dir), "--spectrum", str(a), "--compare", str(b))) == 0
    out = capsys.readouterr().out
    assert all(cells[2] == "-" and float(cells[3]) < 0.9 for cells in _table(out).values())  # no --intruders
    assert "mean similarity" in out


def test_a_fully_fine_tuned_model_against_its_base(model_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    base, _ = load_model(str(model_dir))
    tuned, _ = load_model(str(model_dir))
    weight = tuned.model.layers[0].mlp.up_proj.weight  # (64, 32)
    u0, _, v0h = torch.linalg.svd(weight.detach(), full_matrices=False)
    with torch.no_grad():
        weight += 30.0 * torch.outer(u0[:, 24:].sum(1), v0h[24:].sum(0)) / 8  # spread over 8 weak directions
    tuned.save_pretrained(tmp_path / "tuned")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "tuned")
    assert run_analysis(_args("--spectrum", str(tmp_path / "tuned"), "--base", str(model_dir), "--intruders")) == 0
    table = _table(capsys.readouterr().out)
    reference = intruder_dimensions(base.model.layers[0].mlp.up_proj.weight.detach(), weight.detach(), k=10)
    assert list(table) == ["model.layers.0.mlp.up_proj"]  # the only layer that changed
    erank, norm, intruders, similarity = table["model.layers.0.mlp.up_proj"]
    assert float(erank) == pytest.approx(1.0, abs=0.01) and float(norm) == pytest.approx(30.0, rel=1e-3)
    assert int(intruders) == reference.count == 1 and similarity == "-"


def test_bad_combinations_are_refused_before_loading(model_dir: Path) -> None:
    with pytest.raises(LorakitError, match="give --spectrum"):
        run_analysis(_args("--model", str(model_dir), "--intruders"))
    with pytest.raises(LorakitError, match="drop it or drop --base"):
        run_analysis(_args("--model", str(model_dir), "--spectrum", "x", "--base", "y"))
    with pytest.raises(LorakitError, match="--epsilon"):
        run_analysis(_args("--model", str(model_dir), "--spectrum", "x", "--epsilon", "2"))
