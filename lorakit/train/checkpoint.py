"""The run folder: its identity (``run.json``), metrics log, and atomic checkpoints for exact resumption.

A checkpoint ``checkpoint-<step>/`` holds the adapter in PEFT's format (so it loads anywhere; only its tensors when
a data-driven initialiser rewrote the base, which resumption redoes), ``trainer.pt``
(optimizer, scheduler and RNG states; plain tensors and containers, loadable with ``weights_only=True``) and
``state.json`` (the step and data position). It is written into a temporary folder and renamed into place, so a
crash never leaves a half-written checkpoint; the newest :data:`KEEP` checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hooks import TrainingHook
from ..io.adapter_files import WEIGHTS_FILE, reproducible_from_file, save_adapter
from ..io.files import fsync_path, read_json, read_safetensors, write_json, write_safetensors
from .errors import TrainingError
from .mixture import is_mixture
from .trained import MODEL_FILE, full_state, is_full, trained_state, weights_file

RUN_FILE, METRICS_FILE, TRAINER_FILE, STATE_FILE = "run.json", "metrics.jsonl", "trainer.pt", "state.json"
KEEP = 2
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# Settings that may differ between a run and its resumption (everything else must match).
# A run resumes on another device (a CPU checkpoint on a GPU and back): the tensors are saved on the host.
RESUMABLE_CHANGES = frozenset({"output", "resume", "overwrite", "save_every", "world_size", "device"})


def checkpoints(output: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    found = [(int(m.group(1)), p) for p in output.glob("checkpoint-*") if (m := _CHECKPOINT.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def prepare_output(output: Path, run: dict[str, Any], *, resume: bool, overwrite: bool) -> Path | None:
    """Check that ``output`` may hold this run; returns the checkpoint to resume from (or ``None``).

    Only reads: call it on every process, then let the main process call :func:`start_run`.
    """
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite contradict each other; pick one")
    holds_run = (output / RUN_FILE).is_file()
    if resume:
        if not holds_run:
            raise TrainingError(f"--resume: {output} holds no run to resume (no {RUN_FILE})")
        previous = read_json(output / RUN_FILE)
        changed = sorted(k for k in set(run) | set(previous)
                         if k not in RESUMABLE_CHANGES and run.get(k) != previous.get(k))
        if changed:
            detail = ", ".join(f"{k}: {previous.get(k)!r} -> {run.get(k)!r}" for k in changed)
            raise TrainingError(f"--resume: settings differ from the run in {output} ({detail}); "
                                f"resume with the same settings")
        found = checkpoints(output)
        if not found:
            raise TrainingError(f"--resume: {output} has no checkpoint yet; start again with --overwrite")
        return found[-1]
    if output.exists() and not output.is_dir():
        raise TrainingError(f"--output {output} is a file, not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not holds_run:
            raise TrainingError(f"--output {output} is not empty and holds no lorakit run; pick an empty folder")
        if not overwrite:
            raise TrainingError(f"--output {output} holds another run; use --resume to continue it, --overwrite to "
                                f"replace it, or another --output")
    return None


# What a run writes into its output folder (adapter, full model, mixture, tokenizer, logs): ``--overwrite`` removes
# these and leaves anything else a user put there.
RUN_OUTPUTS = ("run.json", "metrics.jsonl", "loss.png", "checkpoint-*", ".checkpoint-*", "adapter_*",
               "model*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
               "tokenizer*", "special_tokens_map.json", "chat_template.*", "vocab.*", "merges.txt",
               "added_tokens.json", "mixture.json", "router", "experts")


def start_run(output: Path, run: dict[str, Any], *, fresh: bool) -> None:
    """Create ``output`` (an old run's files removed first when ``fresh``) and record the run's settings."""
    if fresh and (output / RUN_FILE).is_file():
        for pattern in RUN_OUTPUTS:
            for path in output.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    output.mkdir(parents=True, exist_ok=True)
    if fresh:
        write_json(output / RUN_FILE, run)


def save_checkpoint(output: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: dict[str, Any], hooks_state: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoint-<state['step']>`` atomically and prune old checkpoints; returns its path."""
    target = output / f"checkpoint-{state['step']}"
    tmp = Path(tempfile.mkdtemp(dir=output, prefix=f".{target.name}."))
    try:
        if is_full(model):
            write_safetensors(tmp / MODEL_FILE, full_state(model), {"format": "pt"})
        elif not is_mixture(model) and reproducible_from_file(model):
            save_adapter(model, tmp)
        else:  # resumable only (a mixture; a base re-initialised from data by the run before loading these)
            write_safetensors(tmp / WEIGHTS_FILE, trained_state(model), {"format": "pt"})
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
                    "hooks": hooks_state or {}}, tmp / TRAINER_FILE)
        fsync_path(tmp / TRAINER_FILE)
        write_json(tmp / STATE_FILE, state)
        fsync_path(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_path(output)  # the rename itself reaches the disk
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoints(output)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    hooks: TrainingHook | None = None, *, restore_rng: bool = True) -> dict[str, Any]:
    """Restore hook state, adapter tensors, optimizer, scheduler (and RNG) from ``path``; returns ``state.json``.

    Hooks are restored first: one that changed ranks reshapes the adapter before its tensors are copied in.
    """
    trainer = torch.load(path / TRAINER_FILE, weights_only=True, map_location="cpu")
    if hooks is not None:
        hooks.load_state_dict(trainer.get("hooks", {}), model)
    saved, _ = read_safetensors(path / weights_file(model))
    current = trained_state(model)
    if set(saved) != set(current):
        raise TrainingError(f"{path} does not fit this model's adapter (keys differ)")
    misfits = sorted(k for k, t in current.items() if t.shape != saved[k].shape)
    if misfits:
        raise TrainingError(f"{path} does not fit this model's adapter (shapes differ for {misfits[:3]})")
    with torch.no_grad():
        for key, tensor in current.items():
            tensor.copy_(saved[key])
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    if restore_rng:
        torch.set_rng_state(trainer["rng"]["torch"])
        if "cuda" in trainer["rng"] and torch.cuda.is_available():  # a run resumed on a GPU without one starts anew
            torch.cuda.set_rng_state(trainer["rng"]["cuda"])
        random.setstate(_as_tuples(trainer["rng"]["python"]))
    return read_json(path / STATE_FILE)


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, ``{"kind": "step" | "eval", ...}``."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """The records; a torn last line (a run killed mid-write) is dropped, a corrupt earlier one refused."""
        if not self.path.is_file():
            return []
        lines = [line for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break  # the write a kill interrupted; rewind() drops it from the file
                raise TrainingError(f"{self.path}: line {i + 1} is not JSON; the metrics log is corrupt") from None
            if not isinstance(record, dict) or "kind" not in record:
                raise TrainingError(f"{self.path}: line {i + 1} is not a metrics record")
            records.append(record)
        return records

    def rewind(self, step: int) -> None:
        """Keep what a resumption from ``step`` keeps: steps up to ``step`` and the evaluation before training."""
        if not self.enabled:
            return
        kept = [r for r in self.read() if (r["kind"] == "step" and r["step"] <= step)
                or (r["kind"] == "eval" and r.get("when") == "before")]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".metrics.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)
