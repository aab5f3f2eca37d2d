"""Train lorakit adapters with 🤗 transformers' ``Trainer`` or TRL's ``SFTTrainer``.

lorakit freezes the base model and leaves only adapter tensors trainable, so any ``Trainer`` already optimises
the right tensors. What this module changes is saving and resuming: a stock ``Trainer`` writes the whole model
(base weights included) into the output folder and every ``checkpoint-N`` and reads it back on resume.
:class:`LorakitTrainerMixin` writes each adapter in PEFT's format instead (``adapter_config.json`` +
``adapter_model.safetensors``, via :func:`lorakit.save_adapter`; ``peft.PeftModel`` loads it) and, on
``train(resume_from_checkpoint=...)`` or ``load_best_model_at_end``, copies the saved tensors back into the
model's adapters in place, so the optimizer keeps the same ``Parameter`` objects. The Trainer itself still saves
and restores the optimizer, scheduler, scaler, RNG and trainer state.

    from transformers import Trainer
    from trl import SFTTrainer
    from lorakit.train.hf_trainer import LorakitTrainer, lorakit_trainer

    trainer = LorakitTrainer(model=model, args=args, train_dataset=ds)        # transformers.Trainer
    trainer = lorakit_trainer(SFTTrainer)(model=model, args=sft_args, ...)     # any Trainer subclass

Layout (PEFT's): adapter ``"default"`` is written at the top of the folder, any other adapter ``x`` in ``x/``.
Single-process and DDP training are supported; DeepSpeed ZeRO-3 / FSDP sharded models are not (their
parameters are not whole on one process).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import Trainer

from ..errors import AdapterFileError
from ..inject import configs, delete_adapter, trainable_parameters
from ..io.adapter_files import load_adapter, save_adapter

DEFAULT = "default"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TRAINING_ARGS_FILE = "training_args.bin"

T = TypeVar("T", bound=type)


def adapter_directory(directory: str | os.PathLike[str], name: str) -> str:
    """Where adapter ``name`` lives under ``directory``: the folder itself for ``"default"``, else ``name/``."""
    return os.fspath(directory) if name == DEFAULT else os.path.join(directory, name)


def _names(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    return list(configs(model)) if names is None else list(names)


def save_adapters(model: nn.Module, directory: str | os.PathLike[str],
                  names: Sequence[str] | None = None) -> list[str]:
    """Write adapters ``names`` (default: all of ``model``'s) to ``directory`` in PEFT's layout; return the
    folders written."""
    return [os.fspath(save_adapter(model, adapter_directory(directory, n), name=n))
            for n in _names(model, names)]


def has_adapters(directory: str | os.PathLike[str], names: Sequence[str]) -> bool:
    """Whether ``directory`` holds a PEFT-format file for each of ``names`` (and ``names`` is not empty)."""
    return bool(names) and all(
        os.path.isfile(os.path.join(adapter_directory(directory, n), f)) for n in names
        for f in (CONFIG_FILE, WEIGHTS_FILE)
    )


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})


def _copy_adapter(model: nn.Module, source: str, name: str) -> None:
    """Fill adapter ``name`` in place from the PEFT-format folder ``source``, through a temporary adapter."""
    params = trainable_parameters(model, name)
    dtype = next((p.dtype for p in params.values() if p.is_floating_point()), None)
    temp = f"_lorakit_restore_{name}"
    load_adapter(model, source, name=temp, activate=False, dtype=dtype)
    try:
        state = model.state_dict(keep_vars=True)
        copied: set[str] = set()
        with torch.no_grad():
            for key, value in state.items():
                parts = key.split(".")
                if temp in parts:
                    target = ".".join(name if part == temp else part for part in parts)
                    if target not in state or state[target].shape != value.shape:
                        raise AdapterFileError(f"{source}: {target!r} does not match adapter {name!r}")
                    state[target].copy_(value)
                    copied.add(target)
        missing = sorted(set(params) - copied)
        if missing:
            raise AdapterFileError(f"{source}: no saved values for {missing[:5]} of adapter {name!r}")
    finally:
        delete_adapter(model, temp)


def restore_adapters(model: nn.Module, directory: str | os.PathLike[str],
                     names: Sequence[str] | None = None) -> list[str]:
    """Copy the tensors saved by :func:`save_adapters` into ``model``'s existing adapters ``names`` (default: all),
    in place: the ``Parameter`` objects (and so an optimizer holding them), ``requires_grad`` flags, active
    adapters and the global RNG state are left as they were. Returns the names restored.

    Each file is read with :func:`lorakit.load_adapter` as a temporary adapter, whose tensors are copied into the
    adapter of the same name and which is then deleted.
    """
    names = _names(model, names)
    flags = {key: p.requires_grad for key, p in model.named_parameters()}
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)):  # the temporary adapter draws random inits
            for name in names:
                _copy_adapter(model, adapter_directory(directory, name), name)
    finally:  # load_adapter marks every adapter trainable: put the caller's flags back
        for key, p in model.named_parameters():
            if key in flags:
                p.requires_grad_(flags[key])
    return names


class LorakitTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (first in the bases) to save and resume lorakit adapters in
    PEFT's format instead of full model copies: ``class MyTrainer(LorakitTrainerMixin, SFTTrainer): ...``.

    ``save_model(dir)`` and every ``checkpoint-N`` hold the adapters (see :func:`save_adapters`), the tokenizer /
    processor and ``training_args.bin``, but no base weights. ``train(resume_from_checkpoint=...)`` and
    ``load_best_model_at_end`` restore the adapters in place from those files (:func:`restore_adapters`); a
    checkpoint without them (or a model without lorakit adapters) goes through the Trainer's own code.
    """

    #: Adapters to save and restore; ``None``: every adapter of the model.
    lorakit_adapters: Sequence[str] | None = None

    def _lorakit_unwrapped(self, model: nn.Module | None = None) -> nn.Module:
        trainer: Any = self
        model = trainer.model if model is None else model
        return trainer.accelerator.unwrap_model(model, keep_torch_compile=False)

    def _lorakit_names(self, model: nn.Module) -> list[str]:
        return _names(model, self.lorakit_adapters)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        """Write the adapters, the processing class and the training arguments to ``output_dir``."""
        trainer: Any = self
        model = self._lorakit_unwrapped()
        if not self._lorakit_names(model):
            return super()._save(output_dir, state_dict=state_dict)  # type: ignore[misc]
        if not trainer.args.should_save:
            return None
        output_dir = trainer.args.output_dir if output_dir is None else output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_adapters(model, output_dir, self.lorakit_adapters)
        tokenizer = trainer.processing_class
        if tokenizer is None:
            tokenizer = getattr(trainer.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(trainer.args, os.path.join(output_dir, TRAINING_ARGS_FILE))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Restore the adapters from ``resume_from_checkpoint`` (PEFT-format files) in place."""
        unwrapped = self._lorakit_unwrapped(model)
        names = self._lorakit_names(unwrapped)
        if not has_adapters(resume_from_checkpoint, names):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        restore_adapters(unwrapped, resume_from_checkpoint, names)
        return None

    def _load_best_model(self) -> None:
        """Restore the adapters of the best checkpoint (``load_best_model_at_end=True``) in place."""
        trainer: Any = self
        best = trainer.state.best_model_checkpoint
        model = self._lorakit_unwrapped()
        names = self._lorakit_names(model)
        if best is None or not has_adapters(best, names):
            return super()._load_best_model()  # type: ignore[misc]
        restore_adapters(model, best, names)
        return None


@functools.cache
def lorakit_trainer(trainer_cls: T) -> T:
    """``trainer_cls`` (``transformers.Trainer`` or a subclass such as ``trl.SFTTrainer``) with
    :class:`LorakitTrainerMixin` mixed in; the same class is returned for the same argument."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"lorakit_trainer expects a transformers.Trainer subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, LorakitTrainerMixin):
        return trainer_cls
    return type(f"Lorakit{trainer_cls.__name__}", (LorakitTrainerMixin, trainer_cls),
                {"__module__": __name__, "__doc__": LorakitTrainerMixin.__doc__})


LorakitTrainer = lorakit_trainer(Trainer)
"""``transformers.Trainer`` that saves and resumes lorakit adapters in PEFT's format."""

__all__ = ["LorakitTrainer", "LorakitTrainerMixin", "adapter_directory", "has_adapters", "lorakit_trainer",
           "restore_adapters", "save_adapters"]
