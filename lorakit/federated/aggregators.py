"""Server-side aggregation of federated LoRA, one layer at a time, as pure functions in a registry.

Client ``k`` (weight ``p_k >= 0``, its share of the examples, normalised to sum 1) uploads its trained roles of a
layer; its update is ``delta_k = s_k B_k A_k`` (LoRA, ``s_k = alpha / r_k``) or ``delta_k = s_k B R_k A`` (LoRA-XS /
LoRA-SB: ``B``, ``A`` frozen and shared). The exact target is ``ideal = sum_k p_k delta_k`` (:func:`ideal_update`):

* ``fedavg`` -- FedAvg (McMahan et al., 2017) of every uploaded tensor, ``X = sum_k p_k X_k``, as FlowerTune /
  OpenFedLLM apply it to ``A`` and ``B``: inexact, ``(sum_k p_k B_k)(sum_k p_k A_k)`` adds the cross terms
  ``p_j p_k B_j A_k``;
* ``ffa-lora`` -- FFA-LoRA (Sun et al., 2024): ``A`` frozen from a shared seed, ``B = sum_k p_k B_k`` is exact since
  ``sum_k p_k B_k A = (sum_k p_k B_k) A``;
* ``fed-sb`` -- Fed-SB (Singhal et al., 2025) on LoRA-SB: ``R = sum_k p_k R_k``, exact, ``r^2`` numbers per client;
* ``flora`` -- FLoRA (Wang et al., 2024), stacking: ``W += [p_1 s_1 B_1 .. p_K s_K B_K] [A_1; ..; A_K]``, exact for
  any client ranks; the adapters restart fresh each round;
* ``fedsvd`` -- FedSVD (Lee et al., 2025): ``B = sum_k p_k B_k`` with ``A`` frozen, and every ``every`` rounds the
  re-basis ``s B A = U S V^T``, ``A = V_r^T`` (orthonormal rows), ``B = U_r S_r / s`` -- the same update;
* ``lora-fair`` -- LoRA-FAIR (Bian et al., 2025): the averages ``A_bar``, ``B_bar`` and the correction
  ``dB = argmin ||(B_bar + dB) A_bar - ideal / s||_F^2 + lam ||dB||_F^2``, the least-squares best with ``A_bar`` fixed.

The trained factor of the exact rules is averaged as ``sum_k p_k (s_k / s) X_k`` (the plain mean when every client's
scale is the global ``s``), so they stay exact when client scales differ. Computation is float32 on the tensors'
device; results come back in the dtype of the server's tensors.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..errors import require
from ..merging.rules import Factors, cat, refactor, relative_error
from ..registry import Registry

LOW_RANK = ("A", "B", "R")


@dataclass(frozen=True)
class LayerRound:
    """One layer in one server round."""

    current: dict[str, Tensor]  # the server's tensors of this layer before the round (every role the adapter has)
    clients: list[dict[str, Tensor]]  # each client's upload (its trained roles; the others are the current ones)
    weights: list[float]  # p_k, >= 0, normalised by :attr:`p`
    scales: list[float]  # s_k of each client (FLoRA: ranks differ, so scales differ)
    scale: float  # the global adapter's scale
    round: int = 1  # 1-based
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.clients)
        require(n > 0, "clients", n, "a round needs at least one client")
        require(len(self.weights) == n, "weights", list(self.weights), f"must give one weight per client ({n} clients)")
        for k, w in enumerate(self.weights):
            require(math.isfinite(w) and w >= 0, f"weights[{k}]", w, f"client {k}'s weight must be finite and >= 0")
        require(sum(self.weights) > 0, "weights", list(self.weights), "must not all be zero")
        require(len(self.scales) == n, "scales", list(self.scales), f"must give one scale per client ({n} clients)")
        require(math.isfinite(self.scale) and self.scale != 0, "scale", self.scale, "must be finite and non-zero")
        require(self.round >= 1, "round", self.round, "rounds count from 1")

    @property
    def p(self) -> list[float]:
        total = sum(self.weights)
        return [w / total for w in self.weights]


@dataclass
class LayerResult:
    tensors: dict[str, Tensor]  # new global values of the roles that changed (the rest stay)
    merged: Factors | None = None  # (up, down): W_base += up @ down, weighted and scaled; the adapter restarts fresh


@dataclass(frozen=True)
class Aggregator:
    name: str
    fn: Callable[[LayerRound], LayerResult]
    method: str  # the lorakit method clients train: "lora", "lora-fa" (A frozen), "lora-xs" (only R trained)
    sends: tuple[str, ...]  # low-rank roles a client uploads
    exact: bool  # the new global update equals the ideal one (to float tolerance)
    fresh: bool = False  # adapters restart each round after their update is merged into the base (client ranks free)
    others: bool = False  # also takes and averages uploaded non-low-rank roles (a DoRA magnitude, ...)
    averaging: bool = True  # the new global depends on the uploads only through their weighted mean (client-level DP)
    summary: str = ""
    init: str | None = None  # the initialiser of the clients' method the paper uses (None: the method's own)


AGGREGATORS: Registry[Aggregator] = Registry("aggregator")


def check_uploads(layer: LayerRound, aggregator: Aggregator) -> None:
    """Refuse an upload whose roles are not exactly ``aggregator.sends`` (plus the first client's other roles where
    the aggregator takes them) or whose shapes do not fit the server's (a fresh aggregator's clients may choose their
    rank)."""
    for role in ("A", "B", *aggregator.sends):
        require(role in layer.current, f"current[{role!r}]", "missing", f"{aggregator.name} needs the server's {role}")
    expected = set(aggregator.sends)
    if aggregator.others:
        expected |= set(layer.clients[0]) - set(LOW_RANK)
    for k, upload in enumerate(layer.clients):
        for role in sorted(set(upload) - expected):
            require(False, f"clients[{k}][{role!r}]", tuple(upload[role].shape),
                    f"{aggregator.name} clients upload only {sorted(expected)} (method {aggregator.method!r}: "
                    "the other roles are the server's)")
        for role in sorted(expected - set(upload)):
            require(False, f"clients[{k}][{role!r}]", "missing", f"{aggregator.name} clients upload {sorted(expected)}")
        for role in sorted(expected):
            require(role in layer.current, f"clients[{k}][{role!r}]", tuple(upload[role].shape),
                    f"the server's adapter has no role {role!r}")
            want = _expected_shape(layer, aggregator, upload, role)
            got = tuple(upload[role].shape)
            hint = " (any rank, the same for A and B)" if aggregator.fresh and role in ("A", "B") else ""
            require(got == want, f"clients[{k}][{role!r}]", got, f"expected shape {want}{hint}")


def _expected_shape(layer: LayerRound, aggregator: Aggregator, upload: dict[str, Tensor], role: str) -> tuple:
    shape = tuple(layer.current[role].shape)
    if not aggregator.fresh or role not in ("A", "B"):
        return shape
    rank = upload["B"].shape[-1] if "B" in upload else layer.current["B"].shape[-1]
    return (rank, shape[1]) if role == "A" else (shape[0], rank)  # A (r_k, d_in), B (d_out, r_k)


def client_update(layer: LayerRound, k: int) -> Factors:
    """``delta_k`` as ``(up, down)``: ``(s_k B_k, A_k)`` or ``(s_k B R_k, A)``, roles not uploaded taken from
    ``current``."""
    roles = {**layer.current, **layer.clients[k]}
    return _factors(roles, layer.scales[k])


def ideal_update(layer: LayerRound) -> Factors:
    """``sum_k p_k delta_k`` as exact factors (the clients' stacked, rank ``sum_k r_k``)."""
    return cat([client_update(layer, k) for k in range(len(layer.clients))], layer.p)


def global_update(layer: LayerRound, result: LayerResult) -> Factors:
    """The global update after the round: ``merged`` where the result has one (the adapter then restarts at a zero
    update), else ``s B' (R') A'`` with the result's roles over ``current``."""
    if result.merged is not None:
        return result.merged[0].float(), result.merged[1].float()
    return _factors({**layer.current, **result.tensors}, layer.scale)


def aggregation_error(layer: LayerRound, result: LayerResult) -> float:
    """``||global - ideal||_F / ||ideal||_F`` (exact aggregators: float rounding only)."""
    return relative_error(global_update(layer, result), ideal_update(layer))


def _factors(roles: dict[str, Tensor], scale: float) -> Factors:
    up = scale * roles["B"].float()  # (d_out, r)
    if "R" in roles:
        up = up @ roles["R"].float()  # (d_out, r)
    return up, roles["A"].float()  # (r, d_in)


def _mean(layer: LayerRound, role: str, scaled: bool = False) -> Tensor:
    """``sum_k p_k X_k``, or ``sum_k p_k (s_k / s) X_k`` with ``scaled`` (the exact rules), in float32."""
    factors = [s / layer.scale if scaled else 1.0 for s in layer.scales]
    return sum(p * f * c[role].float() for p, f, c in zip(layer.p, factors, layer.clients))


def _cast(layer: LayerRound, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {role: t.to(layer.current[role].dtype) if role in layer.current else t for role, t in tensors.items()}


Rule = Callable[[LayerRound], LayerResult]


def _entry(name: str, method: str, sends: tuple[str, ...], exact: bool, fresh: bool = False,
           others: bool = False, averaging: bool = True, init: str | None = None) -> Callable[[Rule], Rule]:
    """Register the decorated rule as an :class:`Aggregator` that checks the uploads first."""
    def wrap(body: Rule) -> Rule:
        @functools.wraps(body)
        def fn(layer: LayerRound) -> LayerResult:
            check_uploads(layer, AGGREGATORS.get(name))
            return body(layer)

        summary = (body.__doc__ or "").strip().splitlines()[0]
        AGGREGATORS.register(name, Aggregator(name, fn, method, sends, exact, fresh, others, averaging, summary, init))
        return fn

    return wrap


@_entry("fedavg", "lora", ("A", "B"), exact=False, others=True)
def fedavg(layer: LayerRound) -> LayerResult:
    """FedAvg (McMahan et al., 2017) of every uploaded tensor: ``X = sum_k p_k X_k``.

    Inexact on LoRA: ``(sum_k p_k B_k)(sum_k p_k A_k) != sum_k p_k B_k A_k`` (the cross terms ``B_j A_k``)."""
    return LayerResult(_cast(layer, {role: _mean(layer, role) for role in layer.clients[0]}))


@_entry("ffa-lora", "lora-fa", ("B",), exact=True)
def ffa_lora(layer: LayerRound) -> LayerResult:
    """FFA-LoRA (Sun et al., 2024): ``A`` frozen from a shared seed, ``B = sum_k p_k B_k`` (exact: A is common)."""
    return LayerResult(_cast(layer, {"B": _mean(layer, "B", scaled=True)}))


@_entry("fed-sb", "lora-xs", ("R",), exact=True, init="lora-sb")
def fed_sb(layer: LayerRound) -> LayerResult:
    """Fed-SB (Singhal et al., 2025): LoRA-SB's ``R = sum_k p_k R_k`` (exact: ``B``, ``A`` shared; r^2 per client)."""
    return LayerResult(_cast(layer, {"R": _mean(layer, "R", scaled=True)}))


@_entry("flora", "lora", ("A", "B"), exact=True, fresh=True, averaging=False)
def flora(layer: LayerRound) -> LayerResult:
    """FLoRA (Wang et al., 2024): stacking, ``W += [p_1 s_1 B_1 .. p_K s_K B_K] [A_1; ..; A_K]`` for any ranks."""
    up, down = ideal_update(layer)  # (d_out, sum r_k), (sum r_k, d_in)
    dtype = layer.current["B"].dtype
    return LayerResult({}, merged=(up.to(dtype), down.to(dtype)))


@_entry("fedsvd", "lora-fa", ("B",), exact=True)
def fedsvd(layer: LayerRound) -> LayerResult:
    """FedSVD (Lee et al., 2025): ``B = sum_k p_k B_k``; every ``every`` rounds ``s B A = U S V^T``, ``A = V_r^T``,
    ``B = U_r S_r / s`` (option ``every``, default 1)."""
    every = layer.options.get("every", 1)
    require(isinstance(every, int) and every >= 1, "options['every']", every, "must be an integer >= 1")
    b_bar = _mean(layer, "B", scaled=True)  # (d_out, r)
    if layer.round % every:
        return LayerResult(_cast(layer, {"B": b_bar}))
    a_old = layer.current["A"].float()  # (r, d_in)
    up, down = refactor((layer.scale * b_bar, a_old), rank=a_old.shape[0])  # (d_out, r), (r, d_in) orthonormal rows
    return LayerResult(_cast(layer, {"B": up / layer.scale, "A": down}))


@_entry("lora-fair", "lora", ("A", "B"), exact=False, averaging=False)
def lora_fair(layer: LayerRound) -> LayerResult:
    """LoRA-FAIR (Bian et al., 2025): ``A_bar``, ``B_bar + dB`` with ``dB`` minimising
    ``||(B_bar + dB) A_bar - ideal / s||_F^2 + lam ||dB||_F^2`` (option ``lam``, default 1e-4):
    ``dB = (ideal A_bar^T / s - B_bar A_bar A_bar^T)(A_bar A_bar^T + lam I)^-1``, the ideal kept factored."""
    lam = layer.options.get("lam", 1e-4)
    require(isinstance(lam, (int, float)) and lam >= 0, "options['lam']", lam, "must be a number >= 0")
    a_bar, b_bar = _mean(layer, "A"), _mean(layer, "B")  # (r, d_in), (d_out, r)
    up, down = ideal_update(layer)  # (d_out, R), (R, d_in)
    gram = a_bar @ a_bar.t()  # (r, r)
    rhs = up @ (down @ a_bar.t()) / layer.scale - b_bar @ gram  # (d_out, r)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    d_b = torch.linalg.solve(gram + lam * eye, rhs, left=False)  # (d_out, r)
    return LayerResult(_cast(layer, {"A": a_bar, "B": b_bar + d_b}))
