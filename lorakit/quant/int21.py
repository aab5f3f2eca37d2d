"""INT2.1 (Chai et al., 2023; METHODS.md entry 41): a 2-bit base plus Low-Rank Error Correction (LREC).

Every linear layer's base is quantised to 2 bits (EMEF: fine-tuning a quantised model through LoRA only), a LoRA
adapter is added, and LREC trains the adapter alone to close the gap to the full-precision model on calibration
inputs:

    min_{A, B}  mean_x || f_fp(x) - f_{Q + sBA}(x) ||^2          (over real positions: padding is masked out)

The abstract gives no loss; we assume regression of the model outputs (logits for a language model) against the
full-precision outputs, which are computed once before quantising (no second model in memory). The 2-bit quantiser
is lorakit's blockwise absmax ``"int2"`` codebook (the paper's INT2; a GPTQ-style quantiser is not assumed).
:func:`effective_bits` is the paper's precision accounting: ``(base bits + adapter bits) / base weights``, where the
claimed 1.05x overhead reads as "INT2.1".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import require
from ..hosts.codecs import storage_bits
from ..inject import adapt, trainable_parameters
from ..methods.lora import LoraConfig
from .model import quantize, quantized_layers

Batch = Tensor | Mapping[str, Tensor]


@dataclass(frozen=True)
class Int21Report:
    """Losses of LREC: the calibration error before training and after each step."""

    losses: list[float]
    initial: float
    final: float


def _outputs(model: nn.Module, batch: Batch) -> Tensor:
    out: Any = model(**batch) if isinstance(batch, Mapping) else model(batch)
    return out.logits if hasattr(out, "logits") else out


def squared_error(output: Tensor, target: Tensor, batch: Batch) -> Tensor:
    """Mean squared error over the batch's real positions: a padded position (``attention_mask`` 0) has no output to
    correct, so it is left out."""
    error = (output.float() - target) ** 2
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is None or error.dim() != mask.dim() + 1:
        return error.mean()
    weight = mask.to(error.dtype).unsqueeze(-1)
    return (error * weight).sum() / (weight.sum() * error.shape[-1])


def calibration_error(model: nn.Module, batches: Sequence[Batch], targets: Sequence[Tensor]) -> float:
    """Mean squared output error of ``model`` against ``targets`` over ``batches`` (real positions only)."""
    with torch.no_grad():
        return sum(squared_error(_outputs(model, b), t, b).item() for b, t in zip(batches, targets)) / len(targets)


def int21(model: nn.Module, config: LoraConfig, calibration: Sequence[Batch], name: str = "default", *,
          scheme: str = "int2", block: int = 64, backend: str = "lorakit", steps: int = 50, lr: float = 1e-3,
          ) -> Int21Report:
    """Quantise ``model``'s linear layers (the config's targets) to ``scheme``, add LoRA ``name`` and run LREC."""
    require(len(calibration) >= 1, "calibration", len(calibration), "must hold at least one batch")
    require(isinstance(steps, int) and steps >= 1, "steps", steps, "must be a positive integer")
    require(lr > 0, "lr", lr, "must be > 0")
    with torch.no_grad():
        targets = [_outputs(model, b).float() for b in calibration]
    quantize(model, scheme, backend, targets=config.targets, exclude=config.exclude, block=block)
    adapt(model, config, name)
    params = list(trainable_parameters(model, name).values())
    optimizer = torch.optim.Adam(params, lr=lr)
    initial = calibration_error(model, calibration, targets)
    losses = []
    for step in range(steps):
        batch, target = calibration[step % len(calibration)], targets[step % len(calibration)]
        loss = squared_error(_outputs(model, batch), target, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return Int21Report(losses, initial, calibration_error(model, calibration, targets))


def effective_bits(model: nn.Module, adapter_bits: int = 16) -> float:
    """``(quantised base bits + adapter parameters * adapter_bits) / quantised base weights``."""
    layers = quantized_layers(model)
    require(bool(layers), "model", type(model).__name__, "has no quantised layers")
    base = sum(storage_bits(m) for m in layers.values())
    adapters = sum(p.numel() for p in trainable_parameters(model).values()) * adapter_bits
    return (base + adapters) / sum(m.in_features * m.out_features for m in layers.values())
