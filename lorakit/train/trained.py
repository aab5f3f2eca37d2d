"""What a run trains: the adapter named ``default``, or every weight of the model (``lorakit finetune --method
full``, for full fine-tuning with AdamW or the memory-efficient optimisers GaLore / Fira / LISA).

Trainer, checkpoints and the final save go through these functions, so neither knows which of the two it handles.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..compress.model import factored_layers, save_compressed
from ..inject import configs, trainable_parameters
from ..io.adapter_files import WEIGHTS_FILE, adapter_tensors
from .errors import TrainingError
from .mixture import is_mixture, mixture_parameters, save_run_mixture
from .warm_start import save_trained

FULL = "full"  # the --method value that trains the whole model instead of an adapter
MODEL_FILE = "model.safetensors"  # a full fine-tune's checkpoint weights (an adapter's are WEIGHTS_FILE)
ADAPTER = "default"


def is_full(model: nn.Module) -> bool:
    """Whether ``model`` is fully fine-tuned (it holds no adapter and no mixture named ``default``)."""
    return ADAPTER not in configs(model) and not is_mixture(model)


def trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The tensors the optimizer updates, by name."""
    if is_full(model):
        return {name: p for name, p in model.named_parameters() if p.requires_grad}
    return mixture_parameters(model) if is_mixture(model) else trainable_parameters(model, ADAPTER)


def trained_state(model: nn.Module) -> dict[str, Tensor]:
    """What a checkpoint holds: every weight (full fine-tuning), the mixture's trained tensors, or the adapter's."""
    if is_full(model):
        return full_state(model)
    return dict(mixture_parameters(model)) if is_mixture(model) else adapter_tensors(model, ADAPTER)


def weights_file(model: nn.Module) -> str:
    """The checkpoint file holding :func:`trained_parameters`' values."""
    return MODEL_FILE if is_full(model) else WEIGHTS_FILE


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """Every weight of a fully fine-tuned model (tied weights once)."""
    return dict(model.named_parameters())


def save_result(model: nn.Module, output: Path, tokenizer: Any = None) -> str:
    """Save what was trained to ``output``: the adapter in PEFT's format, or the whole model (with ``tokenizer``) in
    transformers' format, usable as ``--model output``; returns what was saved (for the report)."""
    if is_mixture(model):
        return save_run_mixture(model, output)
    if not is_full(model):
        return save_trained(model, output, ADAPTER)
    if not hasattr(model, "save_pretrained"):
        raise TrainingError(f"a fully fine-tuned {type(model).__name__} has no save_pretrained: save its state_dict")
    if factored_layers(model):  # a compressed base (LORD) fine-tuned in factored form: keep it loadable as such
        save_compressed(model, tokenizer, output)
        return "fine-tuned compressed model"
    model.save_pretrained(output)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    return "fine-tuned model"
