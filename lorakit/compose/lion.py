"""LiON-LoRA (METHODS.md entry 75): *Rethinking LoRA Fusion to Unify Controllable Spatial and Temporal Generation
for Video Diffusion* -- the toolkit side of its three principles, Linear scalability, Orthogonality, Norm consistency.

On each adapted layer ``l``, a fused model computes ``h = W x + sum_i w_{l,i} delta_i(x)``. :func:`feature_stats`
runs a forward of the model fused with weights ``w`` and measures, per layer, the contributions
``c_i = w_{l,i} delta_i(x)`` of the adapters on the *same* input ``x``, accumulated over every call of the layer:

    G_ij = sum <c_i, c_j>,     norm_i = sqrt(G_ii / P),     cos_ij = G_ij / sqrt(G_ii G_jj)

(``P``: positions seen, i.e. output vectors of width ``d_out``; so ``norm_i`` is the root-mean-square contribution
per token). Orthogonality is ``cos_ij`` near 0. Linear scalability: ``delta`` is linear in the weight, so scaling an
adapter's weight by ``s`` scales its contribution, and its norm, by ``|s|``. Norm consistency:
:func:`consistent_norms` returns fixed per-layer weights ``s_{l,i} = target / norm_{l,i}`` (measured at unit
weights) that bring every adapter's contribution to the same norm on every layer; :class:`LayerWeights` applies
them as a router of :func:`lorakit.mix`.

Left open by the abstract, assumed here: orthogonality and norms are of the flattened contributions over a whole run
(not per token), the norm is the per-token RMS, and the common target defaults to the mean of the measured norms.
Measuring on other inputs than those fused with the new weights (deeper layers see inputs the rescaling changed) only
approximates consistency. The controllable token and modified self-attention of the paper are model code, not here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import LorakitError, require
from ..inject import _check_names, using
from ..routing.strategy import Host
from ..routing.weighted import Router, WeightedRouting


@dataclass
class LayerStats:
    """Gram matrix of one layer's adapter contributions, over ``positions`` output vectors."""

    names: tuple[str, ...]
    gram: Tensor  # (n, n) float64
    positions: int = 0

    @property
    def norms(self) -> dict[str, float]:
        """Per-token RMS norm of each adapter's contribution."""
        rms = (self.gram.diagonal() / max(self.positions, 1)).sqrt()
        return dict(zip(self.names, rms.tolist()))

    @property
    def cosine(self) -> Tensor:
        """``(n, n)`` cosine similarity of the contributions (``nan`` against a zero contribution)."""
        d = self.gram.diagonal().sqrt()
        return self.gram / (d[:, None] * d[None, :])


@dataclass
class _Recorder:
    stats: dict[str, LayerStats] = field(default_factory=dict)

    def add(self, host: Host, names: tuple[str, ...], parts: list[Tensor]) -> None:
        flat = torch.stack([p.detach().reshape(-1).double() for p in parts])  # (n, P * d_out)
        layer = self.stats.setdefault(host.path, LayerStats(names, torch.zeros(len(names), len(names),
                                                                                 dtype=torch.float64)))
        layer.gram += (flat @ flat.T).cpu()
        layer.positions += parts[0].numel() // host.geometry.d_out


class _Probe(WeightedRouting):
    """Dense weighted routing that records each layer's weighted contributions before summing them."""

    def __init__(self, names: Sequence[str], weights: Tensor | Router, recorder: _Recorder) -> None:
        super().__init__(names, weights, "dense")
        self.recorder = recorder

    def forward(self, host: Host, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        base_out = host.base_layer(x, *args, **kwargs)
        present = [(i, n) for i, n in enumerate(self.names) if n in host.adapters]
        if not present:
            return base_out
        weights = self.weights_for(host, x)  # (*tokens, n)
        parts = []
        for i, name in present:
            delta = host.adapters[name](x, base_out, host.backend)
            w = weights[..., i]
            parts.append(w.reshape(*w.shape, *[1] * (delta.dim() - w.dim())).to(delta) * delta)
        self.recorder.add(host, tuple(n for _, n in present), parts)
        return base_out + sum(parts)


def feature_stats(model: nn.Module, names: Sequence[str], run: Callable[[], Any],
                  weights: Tensor | Router | None = None) -> dict[str, LayerStats]:
    """Call ``run()`` (forward passes of ``model``) with adapters ``names`` fused by ``weights`` (default: 1 each, the
    linear sum; or ``(n,)``, per-token weights, a router) and return, per layer holding any of them, the
    :class:`LayerStats` of their contributions."""
    _check_names(model, list(names))
    recorder = _Recorder()
    with torch.no_grad(), using(model, _Probe(names, torch.ones(len(names)) if weights is None else weights, recorder)):
        run()
    if not recorder.stats:
        raise LorakitError(f"run() reached no layer holding the adapters {list(names)}; it must call the model")
    return recorder.stats


class LayerWeights:
    """A router of fixed weights per layer: ``router(path, x) = table[path]`` ``(n,)``, ``default`` elsewhere."""

    def __init__(self, table: Mapping[str, Tensor], default: Tensor | None = None) -> None:
        shapes = {tuple(w.shape) for w in table.values()} | ({tuple(default.shape)} if default is not None else set())
        require(len(shapes) == 1 and len(next(iter(shapes))) == 1, "table", sorted(shapes),
                "must hold weights of one shape (n,), the same for every layer and the default")
        self.table, self.default = dict(table), default

    def __call__(self, path: str, x: Tensor) -> Tensor:
        w = self.table.get(path, self.default)
        if w is None:
            raise LorakitError(f"no weights for layer {path!r} and no default; known layers: {sorted(self.table)[:5]}")
        return w.to(device=x.device, dtype=x.dtype if x.is_floating_point() else None)

    def scaled(self, s: Tensor | float) -> "LayerWeights":
        """The same router with every weight multiplied by ``s`` (a number, or ``(n,)``: one factor per adapter)."""
        default = None if self.default is None else self.default * s
        return LayerWeights({p: w * s for p, w in self.table.items()}, default)


def consistent_norms(stats: Mapping[str, LayerStats], names: Sequence[str],
                     target: float | None = None) -> LayerWeights:
    """Weights ``s_{l,i} = target / norm_{l,i}`` giving every adapter of ``names`` the contribution norm ``target``
    (default: the mean measured norm) on every layer; ``stats`` measured at unit weights. Layers missing an adapter
    of ``names`` give it weight 0 there (there is nothing to scale)."""
    norms = {path: {n: v for n, v in s.norms.items() if n in names} for path, s in stats.items()}
    measured = [v for layer in norms.values() for v in layer.values()]
    require(len(measured) > 0, "stats", sorted(stats)[:3], f"must measure at least one of the adapters {list(names)}")
    zero = [f"{p}:{n}" for p, layer in norms.items() for n, v in layer.items() if not v > 0]
    if zero:
        raise LorakitError(f"contributions with zero norm cannot be rescaled to a common norm: {zero[:3]}")
    goal = sum(measured) / len(measured) if target is None else target
    require(math.isfinite(goal) and goal > 0, "target", goal, "must be a finite positive norm")
    return LayerWeights({path: torch.tensor([goal / layer[n] if n in layer else 0.0 for n in names])
                         for path, layer in norms.items()})
