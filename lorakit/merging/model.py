"""Merge a model's adapters, layer by layer, into a new LoRA adapter.

    report = lorakit.merging.merge_adapters(model, ["a", "b", "c"], [0.5, 0.3, 0.2], rule="ties", rank=16, into="m")
    lorakit.save_adapter(model, "out/m", "m")          # a PEFT LoRA (per-layer ranks), loadable by PEFT

Each layer's update of each adapter is its ``factors()`` (exactly low-rank methods) or its dense ``delta_weight``
(any other method), so adapters of different methods and ranks merge together; a layer some adapters do not touch
merges the others' updates there. The rule's result (:mod:`lorakit.merging.rules`) becomes the new adapter's
factors: exact for ``cat`` / ``linear`` / ``svd`` (or truncated by ``rank`` / ``energy``); the dense results of TIES,
DARE and magnitude pruning are truncated to ``rank`` (default: the sum of the inputs' ranks, what ``cat`` holds). The
returned report gives, per layer, the relative error ``||delta_merged - target|| / ||target||`` against the rule's
own result and against the plain weighted sum ``sum_i w_i delta_i`` (0 for exact rules: the number that says what a
rule changed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import Tensor, nn

from ..errors import LorakitError, require
from ..hosts.host import HostLayer, hosts
from ..inject import _check_names, configs
from ..io.export import attach_factors
from .rules import Update, apply_rule, dense_shape, linear, refactor, relative_error


@dataclass(frozen=True)
class MergeReport:
    """Per layer: rank of the merged update, its relative error to the rule's result and to the weighted sum."""

    ranks: dict[str, int]
    rule_error: dict[str, float]
    sum_error: dict[str, float]

    @property
    def worst_rule_error(self) -> float:
        return max(self.rule_error.values(), default=0.0)

    @property
    def worst_sum_error(self) -> float:
        return max(self.sum_error.values(), default=0.0)


def layer_update(host: HostLayer, name: str) -> Update:
    """Adapter ``name``'s update on ``host``: its factors, else its dense ``delta_weight``."""
    adapter = host.adapters[name]
    if name in host.merged:
        raise LorakitError(f"adapter {name!r} is merged into {host.path!r}; unmerge before merging adapters")
    if any(name == r for r in host.rewriters):
        raise LorakitError(f"adapter {name!r} rewrote the base of {host.path!r} (PiSSA-style); export it with "
                           f"lorakit.export_lora and merge the exported LoRA")
    pair = adapter.factors()
    if pair is not None:
        return pair[0].detach(), pair[1].detach()
    return adapter.delta_weight(host.backend).detach()


def merge_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float] | None = None,
                   rule: str = "cat", into: str = "merged", rank: int | None = None, energy: float | None = None,
                   activate: bool = False, **options: Any) -> MergeReport:
    """Merge adapters ``names`` of ``model`` with ``weights`` (default: 1 each) by ``rule`` into a new LoRA adapter
    ``into`` (truncated to ``rank`` / ``energy`` when given); returns the :class:`MergeReport`."""
    names = list(names)
    require(len(names) > 0 and len(set(names)) == len(names), "names", names, "must be distinct adapter names")
    _check_names(model, names)
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    require(len(weights) == len(names), "weights", weights, f"must give one weight per adapter ({len(names)})")
    require(rank is None or (isinstance(rank, int) and rank >= 1), "rank", rank, "must be None or >= 1")
    require(energy is None or 0 < energy <= 1, "energy", energy, "must be None or in (0, 1]")
    if into in configs(model):
        raise LorakitError(f"adapter {into!r} already exists; pick another name for the merge")
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    ranks, rule_error, sum_error = {}, {}, {}
    for host in hosts(model):
        present = [(n, w) for n, w in zip(names, weights) if n in host.adapters]
        if not present:
            continue
        updates = [layer_update(host, n) for n, _ in present]
        ws = [w for _, w in present]
        result = apply_rule(rule, updates, ws, **options)
        cap = rank
        if cap is None and energy is None and isinstance(result, Tensor):  # a dense result (TIES, DARE, pruning)
            cap = sum(min(dense_shape(u)) if isinstance(u, Tensor) else u[1].shape[0] for u in updates)
        factors[host.path] = refactor(result, cap, energy)
        ranks[host.path] = factors[host.path][1].shape[0]
        rule_error[host.path] = relative_error(factors[host.path], result)
        sum_error[host.path] = relative_error(factors[host.path], linear(updates, ws))
    attach_factors(model, into, factors, activate=activate)
    return MergeReport(ranks, rule_error, sum_error)

