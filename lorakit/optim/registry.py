"""The optimizer registry: ``--optimizer NAME`` and ``build_optimizer`` pick an update rule by name.

An entry is a factory ``(named_params, lr=..., weight_decay=..., roles=..., **options) -> torch.optim.Optimizer``.
It gets the parameters *by name*, with their structural ``roles`` from the adapters' protocol, so rules that treat
tensors differently (LoRA+'s B vs A, GaLore's matrices vs vectors) tell them apart without reading tensor names;
options are the rule's own hyper-parameters (``--optimizer-option key=value``).
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry


class OptimizerFactory(Protocol):
    def __call__(self, named_params: Mapping[str, nn.Parameter], *, lr: float, weight_decay: float,
                 roles: Mapping[str, str] | None = None, **options: Any) -> torch.optim.Optimizer: ...


OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


def build_optimizer(name: str, named_params: Mapping[str, nn.Parameter], *, lr: float, weight_decay: float = 0.0,
                    roles: Mapping[str, str] | None = None, **options: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over ``named_params``; ``roles`` gives the structural role of
    tensors by name (``"up"``: an up-projection factor; see :func:`lorakit.inject.parameter_roles`)."""
    factory = OPTIMIZERS.get(name)
    if not named_params:
        raise ConfigError(f"optimizer {name!r}: there are no trainable parameters to optimize")
    return factory(named_params, lr=lr, weight_decay=weight_decay, roles=roles, **options)


@OPTIMIZERS.decorator("adamw")
def adamw(named_params: Mapping[str, nn.Parameter], *, lr: float, weight_decay: float,
          roles: Mapping[str, str] | None = None, **options: Any) -> torch.optim.Optimizer:
    """Plain AdamW (fused where the device supports it)."""
    unknown = sorted(set(options) - {"betas", "eps"})
    if unknown:
        raise ConfigError(f"optimizer 'adamw' has no option(s) {unknown}; allowed: betas, eps")
    params = list(named_params.values())
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused, **options)
