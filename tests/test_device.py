"""``--device``: resolution and the dtype that goes with it, process-group backends, batches following the model,
and runs that resume on another device. The CUDA tests run where a GPU is present and are skipped elsewhere."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_finetune import adapter, lm_options, step_losses

from lorakit.cli import main
from lorakit.train import ddp
from lorakit.train.device import base_dtype, on_device, resolve_device
from lorakit.train.errors import DataError
from lorakit.train.loop import StepResult, Trainer
from lorakit.train.run import Options, finetune

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_auto_is_the_cpu_without_an_accelerator_and_cuda_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(DataError, match="no CUDA device is available here"):
        resolve_device("cuda:0")
    with pytest.raises(DataError, match="'gpu' is invalid; use auto, cpu, cuda"):
        resolve_device("gpu")
    with pytest.raises(DataError, match="--device 'cuda:x' is invalid"):
        Options(device="cuda:x")


def test_auto_and_cuda_pick_this_processs_gpu_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2) == resolve_device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # an explicit index is kept
    with pytest.raises(DataError, match="has 4 CUDA device"):
        resolve_device("cuda:7")


def test_bf16_is_the_default_on_a_gpu_with_fast_bf16_only(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 1, bf16=True)
    assert base_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert base_dtype(torch.device("cpu")) == torch.float32
    assert base_dtype(torch.device("cuda", 0), bf16=False) == torch.float32
    assert base_dtype(torch.device("cpu"), bf16=True) == torch.bfloat16
    fake_gpus(monkeypatch, 1, bf16=False)
    assert base_dtype(torch.device("cuda", 0)) == torch.float32


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("cuda", "nccl")])
def test_processes_join_with_nccl_exactly_when_the_run_is_on_gpus(monkeypatch: pytest.MonkeyPatch, device: str,
                                                                  backend: str) -> None:
    joined: list[str] = []
    current: list[torch.device] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(ddp.dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(ddp.dist, "init_process_group", lambda b: joined.append(b))
    monkeypatch.setattr(ddp.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(ddp.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(d))
    world = ddp.init_world(torch.device(device, 0) if device == "cuda" else torch.device(device))
    assert joined == [backend] and world == ddp.World(1, 2)
    assert current == ([torch.device("cuda", 0)] if device == "cuda" else [])


def test_the_cli_refuses_a_gpu_it_does_not_have(model_dir: Path, texts: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["finetune", "--model", str(model_dir), "--data", str(texts), "--device", "cuda",
                 "--output", str(tmp_path / "run"), "--steps", "1"])
    assert code == 2 and "--device cuda: no CUDA device is available here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_batches_follow_the_model_to_its_device() -> None:
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    moved = on_device(batch, torch.device("meta"))
    assert moved["input_ids"].device.type == "meta" and batch["input_ids"].device.type == "cpu"


def interrupted_on(device: str, model_dir: Path, texts: Path, run: Path) -> None:
    def interrupt(trainer: Trainer, result: StepResult) -> None:
        if result.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(lm_options(model_dir, texts, run, save_every=3, device=device, bf16=False), callbacks=[interrupt])


def test_a_run_resumes_with_another_device_setting_exactly(model_dir: Path, texts: Path, tmp_path: Path) -> None:
    finetune(lm_options(model_dir, texts, tmp_path / "straight", save_every=3, device="cpu"))
    run = tmp_path / "moved"
    interrupted_on("cpu", model_dir, texts, run)
    finetune(lm_options(model_dir, texts, run, save_every=3, device="auto", bf16=False, resume=True))
    assert step_losses(run) == step_losses(tmp_path / "straight")
    for key, value in adapter(tmp_path / "straight").items():
        assert torch.equal(adapter(run)[key], value), key


@cuda
def test_finetune_on_the_gpu_allocates_there_and_matches_the_cpu(model_dir: Path, texts: Path,
                                                                 tmp_path: Path) -> None:
    torch.cuda.reset_peak_memory_stats()
    on_gpu = finetune(lm_options(model_dir, texts, tmp_path / "gpu", device="cuda", bf16=False))
    assert torch.cuda.max_memory_allocated() > 0
    on_cpu = finetune(lm_options(model_dir, texts, tmp_path / "cpu", device="cpu"))
    assert on_gpu["after"]["loss"] == pytest.approx(on_cpu["after"]["loss"], rel=1e-3)
    for key, value in adapter(tmp_path / "cpu").items():
        torch.testing.assert_close(adapter(tmp_path / "gpu")[key], value, rtol=1e-3, atol=1e-5)


@cuda
@pytest.mark.parametrize("first, then", [("cpu", "cuda"), ("cuda", "cpu")])
def test_a_checkpoint_moves_between_cpu_and_gpu(model_dir: Path, texts: Path, tmp_path: Path, first: str,
                                                then: str) -> None:
    finetune(lm_options(model_dir, texts, tmp_path / "straight", save_every=3, device="cpu"))
    run = tmp_path / "moved"
    interrupted_on(first, model_dir, texts, run)
    finetune(lm_options(model_dir, texts, run, save_every=3, device=then, bf16=False, resume=True))
    assert step_losses(run) == pytest.approx(step_losses(tmp_path / "straight"), rel=1e-3)
