"""Break-for-Make (METHODS.md entry 76): *Modular Low-Rank Adaptations for Composable Content-Style Customization*.

Break: a content and a style LoRA with partly learnable projections. On every target layer one random orthogonal
matrix ``Q`` (``d_in x d_in``, seeded) gives both down-projections as disjoint row blocks,

    A_c = Q[:r_c],   A_s = Q[r_c : r_c + r_s],   so   A_c A_s^T = 0,   A_c A_c^T = I,   A_s A_s^T = I,

frozen for good (the adapters are LoRA-FA adapters: :class:`~lorakit.methods.lora.LoraFA` declares only ``B``
trainable, and :func:`lorakit.adapt` freezes everything it does not declare). Only ``B_c`` and ``B_s`` train, each
adapter separately on its own data (``lorakit.set_active(model, "content")``, then train; the same for style).

Make: the two are concatenated into one adapter of rank ``r_c + r_s`` under a new name,

    [s_c B_c  s_s B_s] [A_c ; A_s] = s_c B_c A_c + s_s B_s A_s        (s: each adapter's alpha / r)

which computes exactly the sum of the two and can then be fine-tuned (``B`` only, or ``A`` too with
``train_a=True``). On an input inside the content row space, ``x = A_c^T z``, ``A_s x = 0``: the made adapter's
output there depends on the content adapter only.

Left open by the abstract, assumed here: what "partly learnable" freezes (here all of ``A``, as an orthonormal random
basis; ``B`` starts at zero), the rank split (the caller's ``r_c``, ``r_s``, with ``r_c + r_s <= d_in``), and the
multi-correspondence projection learning strategy, which is a training recipe (data pairing), not implemented here.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..hosts.host import HostLayer, adapters_named
from ..inject import _check_names, adapt, configs, delete_adapter
from ..merging.rules import cat
from ..methods.lora import Lora, LoraConfig, LoraFAConfig


def orthonormal_rows(rows: int, width: int, generator: torch.Generator) -> Tensor:
    """The first ``rows`` rows of a random ``width x width`` orthogonal matrix (QR of a Gaussian, sign-fixed)."""
    require(1 <= rows <= width, "rows", rows, f"must be in [1, {width}] (the layer's input width)")
    q, r = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed: the sign of each column follows R's diagonal
    return q.T[:rows]


def break_adapters(model: nn.Module, targets: str | Sequence[str], r_content: int, r_style: int,
                   names: tuple[str, str] = ("content", "style"), seed: int = 0) -> None:
    """Add a content and a style LoRA-FA adapter (named ``names``) on ``targets``: ``B = 0``, and down-projections
    that are disjoint, frozen blocks of rows of one seeded random orthogonal matrix per layer. Scale 1
    (``alpha = r``). Neither is activated; on an error the model is left as it was."""
    require(len(names) == 2 and names[0] != names[1], "names", names, "must be two different adapter names")
    taken = [n for n in names if n in configs(model)]
    if taken:
        raise LorakitError(f"adapters {taken} already exist on this model; delete them first or pick other names")
    for_content, for_style = (LoraFAConfig(r=r, alpha=float(r), targets=targets, init="gaussian")
                              for r in (r_content, r_style))
    adapt(model, for_content, names[0], activate=False)
    adapt(model, for_style, names[1], activate=False)
    try:
        _split_down_projections(model, names, torch.Generator().manual_seed(seed))
    except LorakitError:
        for name in names:
            delete_adapter(model, name)
        raise


@torch.no_grad()
def _split_down_projections(model: nn.Module, names: tuple[str, str], generator: torch.Generator) -> None:
    for host, content in adapters_named(model, names[0], Lora):
        style = host.adapters[names[1]]
        r_content = content.a.shape[0]
        q = orthonormal_rows(r_content + style.a.shape[0], content.a[0].numel(), generator)
        content.a.copy_(q[:r_content].reshape(content.a.shape))
        style.a.copy_(q[r_content:].reshape(style.a.shape))


def _lora_layers(model: nn.Module, name: str) -> dict[str, tuple[HostLayer, nn.Module]]:
    layers = {host.path: (host, adapter) for host, adapter in adapters_named(model, name)}
    wrong = sorted(p for p, (_, adapter) in layers.items()
                   if adapter.factors() is None or adapter.bias_delta() is not None)
    if wrong:
        raise LorakitError(f"adapter {name!r} is not exactly B A on {wrong[:3]} (a non-factorable method or a "
                           f"lora_bias); only such updates concatenate into one B A")
    return layers


@torch.no_grad()
def _concatenated(first: nn.Module, second: nn.Module) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of the rank-``r_1 + r_2`` LoRA at scale 1 equal to the sum of ``first`` and ``second``:
    ``A = [A_1; A_2]``, ``B = [s_1 B_1, s_2 B_2]`` (:func:`lorakit.merging.rules.cat`)."""
    up, down = cat([first.factors(), second.factors()], [1.0, 1.0])
    return down, up


def make(model: nn.Module, content: str, style: str, name: str, train_a: bool = False) -> None:
    """Add adapter ``name``: the concatenation of LoRAs ``content`` and ``style`` on every layer (they must hold the
    same layers); it computes their sum. Its ``B`` trains; its ``A`` too when ``train_a``. Not activated."""
    _check_names(model, [content, style])
    first, second = _lora_layers(model, content), _lora_layers(model, style)
    if set(first) != set(second):
        raise LorakitError(f"adapters {content!r} and {style!r} must hold the same layers to be made into one; "
                           f"only one of them holds {sorted(set(first) ^ set(second))[:3]}")
    pieces = {path: _concatenated(adapter, second[path][1]) for path, (_, adapter) in first.items()}
    ranks = {a.shape[0] for a, _ in pieces.values()}
    if len(ranks) != 1:
        raise LorakitError(f"adapters {content!r} and {style!r} have different ranks on different layers "
                           f"({sorted(ranks)} in total); make needs one rank r_c + r_s on every layer")
    rank = ranks.pop()
    config_cls = LoraConfig if train_a else LoraFAConfig
    adapt(model, config_cls(r=rank, alpha=float(rank), targets=sorted(first), init="gaussian"), name, activate=False)
    with torch.no_grad():
        for path, (host, _) in first.items():
            made = host.adapters[name]
            a, b = pieces[path]
            made.a.copy_(a)
            made.b.copy_(b)
