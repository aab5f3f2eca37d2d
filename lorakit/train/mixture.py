"""``lorakit finetune --method mixlora|xlora``: a mixture of LoRA experts as the run's trained thing.

* ``mixlora`` (MixLoRA / LLaVA-MoLE / MoLA): every FFN block (``--method-option blocks=mlp``) becomes a top-k
  mixture of LoRA experts (``--rank/--alpha``, ``--targets`` inside the block, default all its linear layers);
  options ``experts`` (default 4), ``top_k`` (2), ``balance`` (Switch load-balance coefficient, 0.01), ``z_loss``,
  ``noisy``, ``hard``, ``temperature``. Experts and router train.
* ``xlora``: the adapter folders of ``--experts name=folder`` (PEFT or lorakit) are loaded frozen, and X-LoRA's
  scalings head trains (two passes per forward); options ``layerwise``, ``depth``, ``size``, ``top_k``,
  ``softmax_topk``, ``temperature``.

The router is named ``default`` (the run's one trained thing, as a plain adapter is); the run saves the whole mixture
(``mixture.json``, ``router/``, ``experts/<name>/``) to the output folder, and ``lorakit eval --adapter`` reloads it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import LorakitError
from ..inject import routers, trainable_parameters
from ..methods.lora import LoraConfig
from ..mixing import add_router
from ..mixtures.block import add_expert_blocks, expert_blocks
from ..mixtures.files import MIXTURE_FILE, load_experts, load_mixture, save_mixture
from ..mixtures.hooks import RouterLosses
from ..mixtures.xlora import XLoraHead, attach_xlora, xlora_head
from .errors import DataError

MIXTURES = ("mixlora", "xlora")
ROUTER = "default"
BLOCK_OPTIONS = ("experts", "top_k", "blocks", "balance", "z_loss", "noisy", "hard", "temperature", "dispatch")
XLORA_OPTIONS = ("layerwise", "depth", "size", "top_k", "softmax_topk", "temperature")


def check_mixture_options(method: str, options: dict[str, Any], experts: dict[str, Any]) -> None:
    """Refuse options the mixture does not take (called by :class:`~lorakit.train.options.Options`)."""
    allowed = BLOCK_OPTIONS if method == "mixlora" else XLORA_OPTIONS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"--method {method} has no option(s) {unknown}; its options: {', '.join(allowed)}")
    if method == "xlora" and not experts:
        raise DataError("--method xlora mixes existing adapters: give them as --experts name=folder (repeatable)")
    if method == "mixlora" and experts:
        raise DataError("--experts loads frozen experts for --method xlora; mixlora trains its own experts")
    bad = [k for k, v in experts.items() if not isinstance(v, str)]
    if bad:
        raise DataError(f"--experts {bad[0]}=...: give an adapter folder path")


def build_mixture(model: nn.Module, method: str, options: dict[str, Any], experts: dict[str, str], rank: int,
                  alpha: float, targets: Any) -> None:
    """Add the mixture ``method`` to ``model`` with its router named ``default``."""
    if method == "mixlora":
        opts = {"experts": 4, "top_k": 2, "balance": 0.01, **options}
        config = LoraConfig(r=rank, alpha=alpha, targets=targets)
        add_expert_blocks(model, ROUTER, config, **opts)
    elif method == "xlora":
        names = load_experts(model, experts)
        head = add_router(model, ROUTER, xlora_head(model, names, **options))
        attach_xlora(model, head)
    else:
        raise LorakitError(f"unknown mixture {method!r}; mixtures: {', '.join(MIXTURES)}")


def is_mixture(model: nn.Module) -> bool:
    """Whether the run's trained thing is a mixture (a router named ``default``)."""
    return ROUTER in routers(model)


def mixture_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The router's tensors and those of the experts it drives that are not frozen."""
    params = trainable_parameters(model, ROUTER)
    router = routers(model)[ROUTER]
    for name in sorted({n for b in expert_blocks(model) if b.router is router for n in b.experts}):
        params.update(trainable_parameters(model, name))
    return params


def mixture_hooks() -> list[Any]:
    """The hooks a mixture trains with: its router's auxiliary losses and statistics."""
    return [RouterLosses()]


def save_run_mixture(model: nn.Module, output: Path) -> str:
    save_mixture(model, output, ROUTER)
    return "mixture (router + experts)"


def load_run_mixture(model: nn.Module, folder: str | Path) -> bool:
    """Load the mixture saved in ``folder`` when it holds one (X-LoRA heads are attached); returns whether it did."""
    if not (Path(folder) / MIXTURE_FILE).is_file():
        return False
    mixture = load_mixture(model, folder)
    head = routers(model)[mixture.router]
    if isinstance(head, XLoraHead):
        attach_xlora(model, head)
    return True

