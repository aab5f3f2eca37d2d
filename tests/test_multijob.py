"""Multi-job training (mLoRA / LoRAFusion, METHODS.md entry 66): every job trained in the shared mixed batch ends
with the adapter a solo :class:`~lorakit.train.loop.Trainer` run gives it; and the ``finetune --jobs`` path."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import metrics, sentiment_rows, write_jsonl
from transformers import AutoTokenizer, LlamaForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.hooks import training_hooks
from lorakit.methods.base import build_config
from lorakit.train.data import read_records
from lorakit.train.errors import DataError, TrainingError
from lorakit.train.jobs import read_jobs
from lorakit.train.loop import TrainConfig, Trainer
from lorakit.train.multijob import Job, MultiJobTrainer, add_job_adapter
from lorakit.train.run import Options, prepare_data
from lorakit.train.tasks import CausalLMTask, Example

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "sentiment.jsonl", sentiment_rows(60))


# Three jobs that differ in everything a job owns: method, rank, targets, task (right- vs left-padded), batch split,
# learning rate, seed, clipping (job c's is tight enough to clip every step), length (b leaves the batch early) and
# training hooks (d: DyLoRA samples a rank per step in its hook).
JOBS = {
    "a": (build_config("lora", r=4, alpha=8.0), "causal-lm", TrainConfig(steps=5, batch_size=4, lr=1e-2, seed=0)),
    "b": (build_config("dora", r=2, targets=("q_proj", "v_proj")), "causal-lm",
          TrainConfig(steps=3, batch_size=2, grad_accum=3, lr=5e-3, warmup=0.4, seed=1)),
    "c": (build_config("lora", r=8, targets=("gate_proj", "down_proj")), "classification",
          TrainConfig(steps=5, batch_size=3, lr=2e-2, max_grad_norm=0.01, seed=2)),
    "d": (build_config("dylora", r=4), "causal-lm", TrainConfig(steps=4, batch_size=3, lr=1e-2, seed=3)),
}


def _hooks(config: object, name: str, steps: int) -> list:
    return training_hooks(config, name, steps)


def _job_data(model_dir: Path, data: dict[str, Path], name: str) -> tuple:
    task_name = JOBS[name][1]
    opts = Options(model=str(model_dir), data=str(data[task_name]), task=task_name, eval_size=8)
    return prepare_data(opts, AutoTokenizer.from_pretrained(model_dir), read_records(opts.data))


def _trained(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {k.replace(f".adapters.{name}.", ".adapters.X."): p.detach().clone()
            for k, p in lorakit.trainable_parameters(model, name).items()}


def _losses(output: Path) -> list[float]:
    return [r["loss"] for r in metrics(output) if r["kind"] == "step"]


@pytest.fixture(scope="module")
def prepared(model_dir: Path, texts: Path, sentiment: Path) -> dict[str, tuple]:
    data = {"causal-lm": texts, "classification": sentiment}
    return {name: _job_data(model_dir, data, name) for name in JOBS}


@pytest.fixture(scope="module")
def alone(model_dir: Path, prepared: dict[str, tuple], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Each job trained by the solo Trainer: its trained tensors and its per-step losses."""
    out = {}
    for name, (config, _, train_config) in JOBS.items():
        model = LlamaForCausalLM.from_pretrained(model_dir)
        torch.manual_seed(train_config.seed)
        lorakit.adapt(model, config, "default", dtype=torch.float32)
        task, train, _ = prepared[name]
        output = tmp_path_factory.mktemp(f"{name}-alone")
        Trainer(model, task, train, train_config, output, hooks=_hooks(config, "default", train_config.steps)).train()
        out[name] = (_trained(model, "default"), _losses(output))
    return out


# max_tokens: 1 runs every micro-batch on its own; 60 packs some of them; 10**6 mixes every job's rows in one pass
@pytest.mark.parametrize("max_tokens", [1, 60, 10**6])
def test_each_job_trained_together_equals_the_job_trained_alone(model_dir: Path, prepared: dict[str, tuple],
                                                               alone: dict[str, tuple], tmp_path: Path,
                                                               max_tokens: int) -> None:
    together = LlamaForCausalLM.from_pretrained(model_dir)
    jobs = []
    for name, (config, _, train_config) in JOBS.items():
        add_job_adapter(together, config, name, train_config.seed)
        (tmp_path / name).mkdir()
        jobs.append(Job(name, prepared[name][0], prepared[name][1], train_config, tmp_path / name,
                        _hooks(config, name, train_config.steps)))
    start = {name: _trained(together, name) for name in JOBS}
    MultiJobTrainer(together, jobs, max_tokens=max_tokens).train()

    for name, (_, _, train_config) in JOBS.items():
        (expected, losses), got = alone[name], _trained(together, name)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=f"job {name}: {key}")
        assert any(not torch.equal(got[k], start[name][k]) for k in got), f"job {name} did not train"
        assert _losses(tmp_path / name) == pytest.approx(losses, rel=1e-5)
        assert len(losses) == train_config.steps
    assert min(r["grad_norm"] for r in metrics(tmp_path / "c") if r["kind"] == "step") > 0.01  # c was clipped


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_an_adapter_that_rewrites_the_shared_base_is_refused(model_dir: Path, quant: str | None) -> None:
    model = LlamaForCausalLM.from_pretrained(model_dir)
    if quant:  # a quantised base dequantises to a fresh tensor on every read: reading it is not a change
        lorakit.quantize(model, quant)
    add_job_adapter(model, build_config("lora", r=2), "plain", seed=0)
    add_job_adapter(model, build_config("dora", r=2), "dora", seed=0)
    with pytest.raises(TrainingError, match=r"adapter 'pissa' \(lora\) rewrote \['model.layers.0.mlp.down_proj"):
        add_job_adapter(model, build_config("lora", r=2, init="pissa"), "pissa", seed=0)


def test_trainer_refuses_jobs_it_cannot_train_as_asked(model_dir: Path, tmp_path: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(model_dir)
    add_job_adapter(model, build_config("lora", r=2), "a", seed=0)
    task = CausalLMTask(AutoTokenizer.from_pretrained(model_dir), 16)
    job = Job("a", task, [Example([5, 6, 7], labels=[5, 6, 7])], TrainConfig(steps=1), tmp_path)
    with pytest.raises(TrainingError, match="distinct adapter names"):
        MultiJobTrainer(model, [job, job])
    with pytest.raises(TrainingError, match="job 'a' has no training examples"):
        MultiJobTrainer(model, [dataclasses.replace(job, examples=[])])
    with pytest.raises(TrainingError, match="save_every=2, but multi-job training writes no checkpoints"):
        MultiJobTrainer(model, [dataclasses.replace(job, config=TrainConfig(steps=1, save_every=2))])
    with pytest.raises(LorakitError, match="unknown adapter 'b'"):
        MultiJobTrainer(model, [dataclasses.replace(job, name="b")])


def test_finetune_jobs_command_gives_each_job_the_solo_commands_adapter(model_dir: Path, texts: Path, sentiment: Path,
                                                                      tmp_path: Path) -> None:
    jobs = [{"name": "cls", "data": str(sentiment), "task": "classification", "rank": 4, "steps": 4, "lr": 3e-3},
            {"name": "lm", "data": str(texts), "method": "dora", "rank": 2, "targets": "q_proj,v_proj", "steps": 2,
             "batch-size": 4, "seed": 5, "output": str(tmp_path / "elsewhere")}]
    jobs_file = tmp_path / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    common = ["finetune", "--model", str(model_dir), "--eval-size", "8"]
    assert main([*common, "--jobs", str(jobs_file), "--output", str(tmp_path / "together")]) == 0
    assert main([*common, "--data", str(sentiment), "--task", "classification", "--rank", "4", "--steps", "4",
                 "--lr", "3e-3", "--output", str(tmp_path / "solo")]) == 0

    together, solo = tmp_path / "together" / "cls", tmp_path / "solo"
    expected, got = load_file(solo / "adapter_model.safetensors"), load_file(together / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    assert json.loads((together / "adapter_config.json").read_text()) == \
        json.loads((solo / "adapter_config.json").read_text())
    evals = {r["when"]: r["loss"] for r in metrics(together) if r["kind"] == "eval"}
    assert evals == pytest.approx({r["when"]: r["loss"] for r in metrics(solo) if r["kind"] == "eval"}, rel=1e-4)
    lm = tmp_path / "elsewhere"  # its own output; 2 steps while cls ran 4
    assert [r["step"] for r in metrics(lm) if r["kind"] == "step"] == [1, 2]
    assert json.loads((lm / "run.json").read_text())["method"] == "dora"
    loaded = lorakit.load_adapter(LlamaForCausalLM.from_pretrained(model_dir), lm)
    assert lorakit.inject.configs(loaded)["default"].method == "dora"


def _write(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "jobs.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize(("content", "message"), [
    ("[{", "is not valid JSON"),
    ({"name": "a"}, "non-empty JSON list"),
    ([], "non-empty JSON list"),
    (["a"], "job 0: must be a JSON object"),
    ([{"rank": 4}], "job 0: 'name' must be given as a Python identifier"),
    ([{"name": "a-b"}], "'name' must be given as a Python identifier"),
    ([{"name": "a", "rnak": 4}], r"job 0 \('a'\): unknown key 'rnak'; keys: name, model, .*rank"),
    ([{"name": "a", "rank": "8"}], r"'rank' must be int, got '8'"),
    ([{"name": "a", "steps": True}], r"'steps' must be int or null, got True"),
    ([{"name": "a", "lr": 0}], "lr must be > 0, got 0"),
    ([{"name": "a", "rank": 0}], "r=0 is invalid: must be a positive integer"),
    ([{"name": "a", "method": "nope"}], "--method 'nope' is unknown; choose one of: .*lora"),
    ([{"name": "a", "batch_size": 0}], "--batch-size must be >= 1"),
    ([{"name": "a", "steps": 2, "epochs": 1.0}], "give --steps or --epochs, not both"),
    ([{"name": "a", "resume": True}], "'resume' is not supported with --jobs"),
    ([{"name": "a"}, {"name": "a"}], r"every job needs its own name; repeated: \['a'\]"),
    ([{"name": "a", "output": "x"}, {"name": "b", "output": "x"}], "every job needs its own output"),
    ([{"name": "a", "model": "m1"}, {"name": "b", "model": "m2"}], "'model' must be the same for all"),
    ([{"name": "a", "quant": "nf4"}, {"name": "b"}], "'quant' must be the same for all"),
    ([{"name": "a", "optimizer_options": [1]}], "'optimizer_options' must be a JSON object, got \\[1\\]"),
    ([{"name": "a", "quant": "nf4", "init": "pissa"}], "init 'pissa' must see the full-precision base"),
])
def test_jobs_file_errors_name_the_job_the_key_and_the_rule(tmp_path: Path, content: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        read_jobs(_write(tmp_path, content), Options(output=str(tmp_path / "runs")))


def test_jobs_file_defaults_come_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path, [{"name": "a"}, {"name": "b", "rank": 2, "grad-accum": 2, "optimizer_options": {}}])
    a, b = read_jobs(path, Options(rank=6, lr=0.01, output=str(tmp_path / "runs")))
    assert (a.options.rank, a.options.lr, a.options.output) == (6, 0.01, str(tmp_path / "runs" / "a"))
    assert (b.options.rank, b.options.grad_accum, b.adapter.r) == (2, 2, 2)
    assert dataclasses.replace(b.options, rank=6, grad_accum=1, output=a.options.output) == a.options
    assert main(["finetune", "--jobs", str(tmp_path / "missing.json")]) == 2
    assert "jobs file" in capsys.readouterr().err
    assert main(["finetune", "--jobs", str(path), "--save-every", "2"]) == 2
    assert "--save-every: checkpoints during training is not supported with --jobs" in capsys.readouterr().err
