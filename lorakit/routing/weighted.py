"""Weighted routing: a weight per token and named adapter, given or computed by a router (mixtures of LoRA experts).

For layer input ``x`` with tokens ``t`` and adapters ``i = 1..n``:

    out_t = base(x)_t + sum_i  w_{t,i} * delta_i(x)_t          delta_i(x) = adapter_i(x, base(x))

The weights come from outside (a tensor: one weight per adapter ``(n,)``, per row ``(B, n)`` or per token
``(B, T, n)``, the same for every layer) or from a router, any callable ``router(layer_path, x) -> (*tokens, n)``
asked by each layer for its own input (:mod:`.routers`: a gate per layer, softmax, top-k, noise, ...). A
router that is an ``nn.Module`` is registered on the model (``lorakit.add_router``), so its parameters train and save
like an adapter's shared state.

Dispatch (``dispatch=``): ``"sparse"`` (default) runs adapter ``i`` only on the tokens whose weight for it is not
zero (gathered rows, one adapter call, added back with ``index_add``): with a top-k router each adapter sees only its
tokens, and a zero weight is no route (its gradient is zero, as in top-k mixtures). When most weights are non-zero
(a dense softmax, X-LoRA) and every adapter is exactly ``B_i A_i`` on a linear layer, it is two products over the
concatenated factors instead, ``[B_1 .. B_n] (w (.) [A_1; ..; A_n] x)``, whatever ``n``. ``"dense"`` runs every adapter
on every token and multiplies: the reference, whose gradient reaches every weight. Tokens are the positions of the
layer's input but the last axis (linear), every id (embedding), or whole rows (conv: per-row weights only, a
convolution mixes positions).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..errors import LorakitError, require
from .stacked import stackable
from .strategy import Host, Routing

Router = Callable[[str, Tensor], Tensor]
DISPATCHES = ("sparse", "dense")


class WeightedRouting(Routing):
    """``base(x) + sum_i w_i * delta_i(x)`` over adapters ``names`` with weights ``weights`` (tensor or router)."""

    def __init__(self, names: Sequence[str], weights: Tensor | Router, dispatch: str = "sparse") -> None:
        require(len(names) > 0 and len(set(names)) == len(names), "names", list(names),
                "must be one or more distinct adapter names")
        require(dispatch in DISPATCHES, "dispatch", dispatch, f"must be one of {DISPATCHES}")
        if isinstance(weights, Tensor):
            require(weights.dim() in (1, 2, 3) and weights.shape[-1] == len(names), "weights", tuple(weights.shape),
                    f"must be (n,), (rows, n) or (rows, tokens, n) with n = {len(names)} adapters")
        else:
            require(callable(weights), "weights", type(weights).__name__, "must be a tensor or a router callable")
        self.names, self.weights, self.dispatch = list(names), weights, dispatch

    def check(self, host: Host) -> None:
        if host.merged:
            raise LorakitError(f"layer {host.path!r} has merged adapters {host.merged}; unmerge before mixing")

    def weights_for(self, host: Host, x: Tensor) -> Tensor:
        """``(*tokens, n)`` weights of this layer's tokens (``(rows, n)`` on a conv layer)."""
        tokens = _token_shape(host.geometry.kind, x)
        w = self.weights(host.path, x) if callable(self.weights) else self.weights
        n = len(self.names)
        if w.shape[-1] != n or w.dim() - 1 > len(tokens) or tuple(w.shape[:-1]) != tokens[: w.dim() - 1]:
            raise LorakitError(
                f"layer {host.path!r}: routing weights of shape {tuple(w.shape)} do not fit its input of shape "
                f"{tuple(x.shape)}; give (n,), (rows, n) or (rows, tokens, n) with n = {n}"
                + (" (a conv layer takes one weight per row)" if host.geometry.kind == "conv" else ""))
        w = w.reshape(*w.shape[:-1], *([1] * (len(tokens) - w.dim() + 1)), n)
        return w.expand(*tokens, n)

    def forward(self, host: Host, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.apply(host, x, host.base_layer(x, *args, **kwargs))

    def apply(self, host: Host, x: Tensor, base_out: Tensor) -> Tensor:
        """The layer's output for input ``x`` whose frozen output is ``base_out`` (also on a subset of a batch's
        rows: :class:`~lorakit.routing.rows.RowRouting` serves a mixture to its rows this way)."""
        present = [(i, n) for i, n in enumerate(self.names) if n in host.adapters]
        if not present:
            return base_out
        weights = self.weights_for(host, x)
        multipliers = [host.adapters[n].multiplier if n in host.adapters else 1.0 for n in self.names]
        if any(m != 1 for m in multipliers):  # set_scale: each adapter's weight times its runtime multiplier
            weights = weights * torch.tensor(multipliers, device=weights.device)
        flat_x, flat_base = _by_token(host.geometry.kind, x, base_out, math.prod(weights.shape[:-1]))
        if self.dispatch == "sparse" and _concatenable(host, [n for _, n in present], weights):
            columns = weights[..., [i for i, _ in present]].reshape(flat_x.shape[0], len(present))
            return _concatenated(host, [n for _, n in present], columns, flat_x, flat_base).reshape(base_out.shape)
        out = flat_base
        for i, name in present:
            w = weights[..., i].reshape(-1)  # (N,) one weight per token
            adapter = host.adapters[name]
            rows = None if self.dispatch == "dense" else w.nonzero().squeeze(1)  # the tokens routed to it
            if rows is not None and rows.numel() == 0:
                continue
            if rows is None or rows.numel() == w.numel():
                out = out + _per_token(w, out) * adapter(flat_x, flat_base, host.backend)
                continue
            delta = adapter(flat_x.index_select(0, rows), flat_base.index_select(0, rows), host.backend)
            out = out.index_add(0, rows, _per_token(w.index_select(0, rows), delta) * delta)
        return out.reshape(base_out.shape)


def _concatenable(host: Host, names: list[str], weights: Tensor) -> bool:
    """Whether the concatenated product pays: linear layer, every adapter exactly ``B_eff A_eff``, and more than half
    of the weights non-zero (a dense router; a top-k one gathers each adapter's tokens instead)."""
    return (len(names) > 1 and all(stackable(host.adapters[n], host.geometry.kind) for n in names)
            and 2 * int((weights != 0).sum()) > weights.numel())


def _concatenated(host: Host, names: list[str], weights: Tensor, x: Tensor, base_out: Tensor) -> Tensor:
    """``base + sum_i w_i B_i A_i x`` as two products over the concatenated factors: ``[B_1 .. B_n] (w (.) [A_1; ..;
    A_n] x)``, each weight repeated over its adapter's ranks."""
    factors = [host.adapters[n].factors() for n in names]  # (B_eff (d_out, r_i), A_eff (r_i, d_in))
    a, b = torch.cat([f[1] for f in factors]), torch.cat([f[0] for f in factors], dim=1)
    ranks = torch.tensor([f[1].shape[0] for f in factors], device=weights.device)
    weights = weights * (weights != 0)  # a zero weight is no route: no gradient, as on the gathered path
    h = (x.to(a.dtype) @ a.t()) * weights.repeat_interleave(ranks, dim=1).to(a.dtype)  # (N, sum r_i)
    return base_out + (h @ b.t()).to(base_out.dtype)


def _token_shape(kind: str, x: Tensor) -> tuple[int, ...]:
    return {"linear": tuple(x.shape[:-1]), "embedding": tuple(x.shape), "conv": tuple(x.shape[:1])}[kind]


def _by_token(kind: str, x: Tensor, base_out: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Input and base output with the ``n`` tokens along the first axis (conv layers: the rows as they are)."""
    if kind == "conv":
        return x, base_out
    return (x.reshape(n, -1) if kind == "linear" else x.reshape(n)), base_out.reshape(n, base_out.shape[-1])


def _per_token(w: Tensor, like: Tensor) -> Tensor:
    """``w (N,)`` shaped to multiply ``like (N, ...)`` token by token."""
    return w.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)
