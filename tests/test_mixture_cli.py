"""``lorakit finetune --method mixlora|xlora``: a mixture trains, logs its routing, saves as one folder, resumes
exactly and reloads with ``lorakit eval``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import metrics
from test_finetune import lm_options, step_losses

from lorakit.train.errors import DataError
from lorakit.train.loop import StepResult, Trainer
from lorakit.train.run import Options, evaluate_adapter, finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mixlora_run_trains_router_and_experts_and_logs_routing(model_dir: Path, texts: Path, tmp_path: Path):
    out = tmp_path / "mix"
    result = finetune(lm_options(model_dir, texts, out, method="mixlora", rank=2, alpha=4,
                                 method_options={"experts": 3, "top_k": 2, "balance": 0.05}))
    assert result["after"]["loss"] < result["before"]["loss"]
    steps = [r for r in metrics(out) if r["kind"] == "step"]
    assert all(0 <= r["router/default/entropy"] <= torch.log(torch.tensor(3.0)).item() + 1e-6 for r in steps)
    assert all(sum(r[f"router/default/load_{i}"] for i in range(3)) == pytest.approx(1.0) for r in steps)
    assert (out / "mixture.json").is_file() and sorted(p.name for p in (out / "experts").iterdir()) == [
        "default_0", "default_1", "default_2"]
    router = load_file(out / "router" / "router.safetensors")
    assert any(t.abs().sum() > 0 for t in router.values())  # the zero-initialised gates trained
    reloaded = evaluate_adapter(lm_options(model_dir, texts, tmp_path / "e", method="mixlora",
                                           method_options={"experts": 3}), str(out))
    assert reloaded["after"]["loss"] == pytest.approx(result["after"]["loss"], rel=1e-5)


def test_xlora_run_trains_only_the_head_and_resumes_exactly(model_dir: Path, texts: Path, tmp_path: Path):
    experts = {}
    for name, seed in (("a", 1), ("b", 2)):
        finetune(lm_options(model_dir, texts, tmp_path / name, steps=3, seed=seed, rank=2, targets="q_proj,v_proj"))
        experts[name] = str(tmp_path / name)
    options = dict(method="xlora", experts=experts, method_options={"layerwise": True}, save_every=2, lr=1e-2)
    finetune(lm_options(model_dir, texts, tmp_path / "straight", **options))

    def interrupt(trainer: Trainer, result: StepResult) -> None:
        if result.step == 5:
            raise KeyboardInterrupt

    run = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        finetune(lm_options(model_dir, texts, run, **options), callbacks=[interrupt])
    finetune(lm_options(model_dir, texts, run, **options, resume=True))
    assert step_losses(run) == step_losses(tmp_path / "straight")
    for name, folder in experts.items():  # frozen experts: saved bit-identical to their source
        saved = load_file(run / "experts" / name / "adapter_model.safetensors")
        source = load_file(Path(folder) / "adapter_model.safetensors")
        assert saved.keys() == source.keys() and all(torch.equal(saved[k], source[k]) for k in saved)


def test_mixture_options_are_checked():
    with pytest.raises(DataError, match="--experts name=folder"):
        Options(method="xlora")
    with pytest.raises(DataError, match="no option"):
        Options(method="mixlora", method_options={"rank": 3})
    with pytest.raises(DataError, match="--experts"):
        Options(method="lora", experts={"a": "x"})
