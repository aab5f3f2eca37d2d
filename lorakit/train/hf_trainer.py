"""Train lorakit adapters with 🤗 transformers' ``Trainer`` or TRL's ``SFTTrainer``.

lorakit freezes the base model and leaves only adapter tensors trainable, so any ``Trainer`` already optimises
the right tensors. What this module changes is saving and resuming: a stock ``Trainer`` writes the whole model
(base weights included) into the output folder and every ``checkpoint-N`` and reads it back on resume.
:class:`LorakitTrainerMixin` writes each adapter in PEFT's format instead (``adapter_config.json`` +
``adapter_model.safetensors``, via :func:`lorakit.save_adapter`; ``peft.PeftModel`` loads it) and, on
``train(resume_from_checkpoint=...)`` or ``load_best_model_at_end``, copies the saved tensors back into the
model's adapters in place, so the optimizer keeps the same ``Parameter`` objects. The Trainer itself still saves
and restores the optimizer, scheduler, scaler, RNG and trainer state.

It also runs lorakit's training hooks (:mod:`lorakit.hooks`), so a method with a training rule (SoRA's proximal gate
step and pruning, DyLoRA's rank sampling, LaMDA's freezing, SaRA's nuclear-norm regulariser, ...) trains as it does
with ``lorakit finetune``: by default the hooks :func:`lorakit.hooks.training_hooks` gives for every trained adapter,
built when training starts (for ``state.max_steps`` steps), plus any passed as ``lorakit_hooks=[...]``. They are
called at the points of lorakit's own loop (see :class:`LorakitTrainerMixin`), their state is saved in each
``checkpoint-N`` (``lorakit_hooks.pt``) and restored on resume before the adapter tensors and the optimizer.

    from transformers import Trainer
    from trl import SFTTrainer
    from lorakit.train.hf_trainer import LorakitTrainer, lorakit_trainer

    trainer = LorakitTrainer(model=model, args=args, train_dataset=ds)        # transformers.Trainer
    trainer = lorakit_trainer(SFTTrainer)(model=model, args=sft_args, ...)     # any Trainer subclass

Layout (PEFT's): adapter ``"default"`` is written at the top of the folder, any other adapter ``x`` in ``x/``.
Single-process and DDP training are supported; DeepSpeed ZeRO-3 / FSDP sharded models are not (their
parameters are not whole on one process). Hooks that replace trained tensors (SoRA / AdaLoRA / IncreLoRA changing
ranks) need a single process: DDP keeps the tensors it was built with.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import AdapterFileError, LorakitError
from ..hooks import HookList, TrainingHook, training_hooks
from ..inject import configs, delete_adapter, trainable_parameters
from ..io.adapter_files import load_adapter, save_adapter

DEFAULT = "default"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TRAINING_ARGS_FILE = "training_args.bin"
HOOKS_FILE = "lorakit_hooks.pt"  # HookList.state_dict() of a checkpoint (torch.save; loads with weights_only=True)

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


class _HookCallback(TrainerCallback):
    """Calls the trainer's lorakit hooks at the Trainer's events; the regulariser is added by
    :meth:`LorakitTrainerMixin.training_step` (it must reach the gradient before clipping)."""

    def __init__(self, trainer: LorakitTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # after the optimizer exists and a resumption was loaded; before the first step (lorakit's order)
        trainer = self.trainer
        if trainer._lorakit_pending is not None:  # a transformers version that resumes along another path
            raise LorakitError(f"resuming from {trainer._lorakit_pending}: the adapters were not restored (the "
                               f"Trainer did not call _load_optimizer_and_scheduler); this transformers version "
                               f"is not supported by lorakit.train.hf_trainer")
        trainer._lorakit_hooks().on_train_begin(trainer._lorakit_unwrapped(), trainer.optimizer)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # before the step's first micro-batch forward
        self.trainer._lorakit_hooks().before_forward(self.trainer._lorakit_unwrapped(), state.global_step)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # after every backward and the gradient clipping, before optimizer.step()
        trainer = self.trainer
        trainer._lorakit_hooks().before_step(trainer._lorakit_unwrapped(), trainer.optimizer, state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # after optimizer.step(), the scheduler step, zero_grad and global_step += 1; before logging and saving
        trainer = self.trainer
        trainer._lorakit_hooks().after_step(trainer._lorakit_unwrapped(), trainer.optimizer, state.global_step)


class LorakitTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (first in the bases) to save and resume lorakit adapters in
    PEFT's format instead of full model copies, and to train them with their method's training hooks:
    ``class MyTrainer(LorakitTrainerMixin, SFTTrainer): ...``.

    ``save_model(dir)`` and every ``checkpoint-N`` hold the adapters (see :func:`save_adapters`), the tokenizer /
    processor and ``training_args.bin``, but no base weights. ``train(resume_from_checkpoint=...)`` and
    ``load_best_model_at_end`` restore the adapters in place from those files (:func:`restore_adapters`); a
    checkpoint without them (or a model without lorakit adapters) goes through the Trainer's own code.

    Training hooks (:class:`lorakit.hooks.TrainingHook`): when ``train()`` starts, :attr:`lorakit_hook_list` is built
    from :func:`lorakit.hooks.training_hooks` for each adapter (of :attr:`lorakit_adapters`) with a tensor that
    requires grad, for ``state.max_steps`` steps (unless ``lorakit_method_hooks=False``), followed by the extra
    ``lorakit_hooks``; both are constructor keywords or class attributes. They are called as lorakit's own loop
    calls them: ``on_train_begin`` after the optimizer is made (and a resumption loaded); ``before_forward`` at the
    Trainer's ``on_step_begin`` (before the step's first micro-batch); the regulariser once per optimizer step,
    backpropagated after the step's last micro-batch (before gradient clipping); ``before_step`` at
    ``on_pre_optimizer_step`` (after clipping); ``after_step`` at ``on_step_end`` (after ``optimizer.step()``, the
    scheduler and ``global_step += 1``, before the checkpoint of that step). Hooks get the unwrapped model and the
    Trainer's (accelerate-wrapped) optimizer, whose parameter groups and state are the wrapped optimizer's, so
    :func:`lorakit.hooks.replace_parameter` works on it.

    Each ``checkpoint-N`` stores the hooks' state in ``lorakit_hooks.pt``. On resume the Trainer makes the optimizer
    from the fresh model's tensors; then the hooks are built and their state loaded (a rank hook reshapes the
    adapter's tensors in place to the checkpoint's ranks), the adapter tensors are copied in, and only then the
    Trainer loads the optimizer's state: lorakit's order.
    """

    #: Adapters to save and restore; ``None``: every adapter of the model.
    lorakit_adapters: Sequence[str] | None = None
    #: Extra hooks, called after the method hooks.
    lorakit_hooks: Sequence[TrainingHook] = ()
    #: Whether to add :func:`lorakit.hooks.training_hooks` of every trained adapter.
    lorakit_method_hooks: bool = True
    #: The hooks of the current (or last) ``train()`` call; ``None`` before training starts.
    lorakit_hook_list: HookList | None = None

    def __init__(self, *args: Any, lorakit_hooks: Sequence[TrainingHook] | None = None,
                 lorakit_method_hooks: bool | None = None, **kwargs: Any) -> None:
        if lorakit_hooks is not None:
            HookList(lorakit_hooks)  # refuse a non-hook now, not when training starts
            self.lorakit_hooks = list(lorakit_hooks)
        if lorakit_method_hooks is not None:
            self.lorakit_method_hooks = lorakit_method_hooks
        self._lorakit_pending: str | None = None  # checkpoint whose adapters wait for the hooks' state
        super().__init__(*args, **kwargs)
        trainer: Any = self
        trainer.add_callback(_HookCallback(self))

    def _lorakit_unwrapped(self, model: nn.Module | None = None) -> nn.Module:
        trainer: Any = self
        model = trainer.model if model is None else model
        return trainer.accelerator.unwrap_model(model, keep_torch_compile=False)

    def _lorakit_names(self, model: nn.Module) -> list[str]:
        return _names(model, self.lorakit_adapters)

    # -- training hooks ------------------------------------------------------------------------------------------
    def train(self, *args: Any, **kwargs: Any) -> Any:
        self.lorakit_hook_list = None  # built again for this call's number of steps
        return super().train(*args, **kwargs)  # type: ignore[misc]

    def _lorakit_hooks(self) -> HookList:
        """The hooks of this ``train()`` call, built at its first need (``state.max_steps`` is known by then)."""
        if self.lorakit_hook_list is None:
            trainer: Any = self
            model = self._lorakit_unwrapped()
            hooks: list[TrainingHook] = []
            if self.lorakit_method_hooks:
                for name in self._lorakit_names(model):
                    if any(p.requires_grad for p in trainable_parameters(model, name).values()):
                        hooks += training_hooks(configs(model)[name], name, trainer.state.max_steps)
            self.lorakit_hook_list = HookList([*hooks, *self.lorakit_hooks])
        return self.lorakit_hook_list

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The Trainer's micro-batch step; after the last micro-batch of an optimizer step (the Trainer marks it with
        ``gradient_state.sync_gradients``), also backpropagate the hooks' regulariser: once per step, before the
        gradient clipping, through ``accelerator.backward`` (so an fp16 loss scale applies to it too). The returned
        loss is the data loss, as lorakit's loop logs it."""
        loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
        trainer: Any = self
        hooks = self.lorakit_hook_list
        if hooks is not None and hooks.hooks and trainer.accelerator.gradient_state.sync_gradients:
            extra = hooks.regulariser(self._lorakit_unwrapped())
            if extra is not None:  # under DDP: after the synchronised backward, each process adds the same term
                trainer.accelerator.backward(extra)
        return loss

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write the hooks' state into ``checkpoint-N`` first, then let the Trainer save the rest of it."""
        trainer: Any = self
        hooks = self.lorakit_hook_list
        if hooks is not None and hooks.hooks and trainer.args.should_save:
            folder = os.path.join(trainer._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(hooks.state_dict(), os.path.join(folder, HOOKS_FILE))
        return super()._save_checkpoint(model, trial)  # type: ignore[misc]

    def _lorakit_load_hooks(self, checkpoint: str, *, required: bool) -> None:
        """Load the hooks' state saved in ``checkpoint``; a rank hook reshapes the adapter to the saved ranks."""
        hooks = self._lorakit_hooks()
        path = os.path.join(checkpoint, HOOKS_FILE)
        if os.path.isfile(path):
            hooks.load_state_dict(torch.load(path, weights_only=True), self._lorakit_unwrapped())
        elif hooks.hooks and required:
            raise LorakitError(f"{checkpoint} holds no {HOOKS_FILE}, but this run trains with the training hooks "
                               f"{[type(h).__name__ for h in hooks.hooks]}: resume a checkpoint written with them")

    # -- saving and restoring ------------------------------------------------------------------------------------
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
        """Resumption, first part (before the optimizer exists): note the checkpoint whose PEFT-format adapters
        :meth:`_load_optimizer_and_scheduler` restores, once the hooks' state has given them the saved shapes."""
        unwrapped = self._lorakit_unwrapped(model)
        names = self._lorakit_names(unwrapped)
        if not has_adapters(resume_from_checkpoint, names):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        self._lorakit_pending = resume_from_checkpoint
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Resumption, second part (the optimizer holds the model's tensors): the hooks' state (which may reshape
        the adapters in place), the adapter tensors, then the Trainer's optimizer and scheduler state."""
        if checkpoint is not None:
            self._lorakit_load_hooks(checkpoint, required=True)
            if self._lorakit_pending == checkpoint:
                model = self._lorakit_unwrapped()
                restore_adapters(model, checkpoint, self._lorakit_names(model))
                self._lorakit_pending = None
        return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]

    def _load_best_model(self) -> None:
        """Restore the adapters of the best checkpoint (``load_best_model_at_end=True``) in place (after giving them
        its ranks when the hooks changed them since)."""
        trainer: Any = self
        best = trainer.state.best_model_checkpoint
        model = self._lorakit_unwrapped()
        names = self._lorakit_names(model)
        if best is None or not has_adapters(best, names):
            return super()._load_best_model()  # type: ignore[misc]
        self._lorakit_load_hooks(best, required=False)
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
"""``transformers.Trainer`` that saves and resumes lorakit adapters in PEFT's format and runs their training hooks."""

__all__ = ["HOOKS_FILE", "LorakitTrainer", "LorakitTrainerMixin", "adapter_directory", "has_adapters",
           "lorakit_trainer", "restore_adapters", "save_adapters"]
