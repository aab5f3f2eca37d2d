"""One-shot low-rank decomposition of a linear layer, ``W (d_out, d_in) ~ U V`` (LORD, METHODS.md entry 67).

Every method truncates the SVD of a *weighted* matrix ``L W R`` and undoes the weighting on the factors:

    L W R = P S Q^T,   U = L^-1 P_k S_k^1/2,   V = S_k^1/2 Q_k^T R^-1

* ``"svd"``: ``L = R = I``. Eckart--Young: the best rank-``k`` approximation in spectral and Frobenius norm, with
  ``||W - U V||_2 = sigma_{k+1}``.
* ``"activation"``: activation-aware SVD, minimising the *output* error ``||(W - U V) X^T||`` on calibration inputs
  ``X``. ``stats`` is either the per-input-feature RMS ``s`` (ASVD: ``R = diag(s)``) or the Gram matrix ``X^T X``
  (SVD-LLM's whitening: ``R = C``, the Cholesky factor of ``X^T X = C C^T``; the exact minimiser of
  ``||(W - U V) X^T||_F`` over rank ``k``).
* ``"fisher"``: Fisher-weighted SVD (FWSVD, Hsu et al. 2022): ``L = diag(sqrt(I_i))`` with ``I_i`` the
  summed squared loss gradients of row (output unit) ``i``, the exact minimiser of ``sum_i I_i ||W_i - (U V)_i||^2``.
  ``stats`` is the ``(d_out,)`` row sums or the ``(d_out, d_in)`` summed squared gradients.

Statistics are damped like GPTQ's Hessian (``+ 1%`` of their mean on the diagonal), so a feature or row the
calibration never excited still gets a finite, small weight. At full rank every method reproduces ``W`` exactly.
:func:`calibration_stats` gathers the statistic of each method from a model and batches.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError, require
from .factored import FactoredLinear

DECOMPOSITIONS = ("svd", "activation", "fisher")
DAMPING = 0.01  # share of the statistic's mean added to its diagonal (GPTQ's percdamp)

LossFn = Callable[[nn.Module, Any], Tensor]


def choose_rank(spectrum: Tensor, rank: int | None = None, energy: float | None = None) -> int:
    """``rank``, or the fewest leading values of ``spectrum`` holding ``energy`` of its squared sum (both: the
    smaller; neither: all of them)."""
    full = spectrum.numel()
    require(rank is None or (isinstance(rank, int) and 1 <= rank <= full), "rank", rank,
            f"must be an integer in [1, {full}] (min(d_out, d_in) of this layer)")
    require(energy is None or 0 < energy <= 1, "energy", energy, "must be in (0, 1]")
    k = full if rank is None else rank
    if energy is not None:
        power = spectrum.double() ** 2
        share = torch.cumsum(power, 0) / power.sum().clamp_min(1e-300)
        k = min(k, int((share < energy).sum()) + 1, full)
    return k


def _damping(values: Tensor) -> Tensor:
    """``DAMPING`` times the mean of ``values`` (a statistic's diagonal), refused when that is zero."""
    mean = values.mean()
    require(bool(mean > 0), "stats", "all zero", "the calibration statistic is zero for this layer: the batches "
            "never reached it (or every gradient vanished)")
    return DAMPING * mean


def _non_negative(stats: Tensor, what: str) -> Tensor:
    require(bool(torch.isfinite(stats).all()) and bool((stats >= 0).all()), "stats", what,
            "must be finite and non-negative")
    return stats.double()


def _weighting(method: str, stats: Tensor | None, d_out: int, d_in: int) -> tuple[Tensor | None, Tensor | None]:
    """``(L, R)``: ``L`` a ``(d_out,)`` row weight, ``R`` a ``(d_in,)`` column weight or ``(d_in, d_in)`` lower
    Cholesky factor; ``None`` for the identity."""
    require(method in DECOMPOSITIONS, "method", method, f"must be one of {', '.join(DECOMPOSITIONS)}")
    if method == "svd":
        require(stats is None, "stats", type(stats).__name__, "method 'svd' takes no statistic")
        return None, None
    if not isinstance(stats, Tensor):
        raise ConfigError(f"stats={type(stats).__name__} is invalid: method {method!r} needs its calibration "
                          "statistic (lorakit.compress.calibration_stats, or compress_model(calibration=...))")
    if method == "fisher":
        require(tuple(stats.shape) in ((d_out,), (d_out, d_in)), "stats", tuple(stats.shape),
                f"fisher needs the ({d_out},) row sums or ({d_out}, {d_in}) summed squared gradients")
        rows = _non_negative(stats, "squared gradients").reshape(d_out, -1).sum(1)
        return (rows + _damping(rows)).sqrt(), None
    require(tuple(stats.shape) in ((d_in,), (d_in, d_in)), "stats", tuple(stats.shape),
            f"activation needs the ({d_in},) input RMS or the ({d_in}, {d_in}) Gram matrix X^T X")
    if stats.dim() == 1:
        power = _non_negative(stats, "input RMS") ** 2
        return None, (power + _damping(power)).sqrt()
    gram = stats.double()
    require(bool(torch.isfinite(gram).all()) and torch.allclose(gram, gram.T, rtol=1e-4, atol=1e-6 * float(
        gram.abs().max())), "stats", "Gram matrix", "must be finite and symmetric (X^T X)")
    damped = gram + _damping(gram.diagonal()) * torch.eye(d_in, dtype=gram.dtype)
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        raise ConfigError("stats: the Gram matrix is not positive semi-definite (is it X^T X of real inputs?)")
    return None, factor


def low_rank(weight: Tensor, rank: int | None = None, energy: float | None = None, method: str = "svd",
             stats: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(U (d_out, k), V (k, d_in), spectrum)`` of ``weight`` ``(d_out, d_in)`` in float64 (see the module doc);
    ``spectrum`` holds all singular values of the weighted matrix ``L W R``."""
    require(isinstance(weight, Tensor) and weight.dim() == 2, "weight", getattr(weight, "shape", weight),
            "must be a 2-D (d_out, d_in) matrix")
    require(bool(torch.isfinite(weight).all()), "weight", "non-finite", "must hold only finite values")
    d_out, d_in = weight.shape
    left, right = _weighting(method, stats, d_out, d_in)
    matrix = weight.detach().double()
    if left is not None:
        matrix = left[:, None] * matrix
    if right is not None:
        matrix = matrix * right if right.dim() == 1 else matrix @ right
    p, s, qh = torch.linalg.svd(matrix, full_matrices=False)  # (d_out, r), (r,), (r, d_in)
    k = choose_rank(s, rank, energy)
    root = s[:k].sqrt()
    up, down = p[:, :k] * root, root[:, None] * qh[:k]  # balanced split: both factors train at one scale
    if left is not None:
        up = up / left[:, None]
    if right is not None:
        down = down / right if right.dim() == 1 else torch.linalg.solve_triangular(right, down, upper=False,
                                                                                   left=False)
    return up, down, s


def decompose(layer: nn.Linear | Tensor, rank: int | None = None, energy: float | None = None, method: str = "svd",
              stats: Tensor | None = None) -> FactoredLinear:
    """A :class:`FactoredLinear` approximating ``layer`` (an ``nn.Linear`` or a ``(d_out, d_in)`` weight) at
    ``rank`` and/or ``energy`` (share in ``(0, 1]`` of the squared Frobenius norm of the weighted matrix; neither:
    full rank, exact), by ``method`` with calibration statistic ``stats`` (see the module doc)."""
    if isinstance(layer, nn.Linear):
        weight, bias = layer.weight, layer.bias
    else:
        require(isinstance(layer, Tensor), "layer", type(layer).__name__, "must be an nn.Linear or a weight tensor")
        weight, bias = layer, None
    require(weight.is_floating_point(), "weight", weight.dtype, "must be floating point (dequantise first)")
    up, down, _ = low_rank(weight, rank, energy, method, stats)
    factored = FactoredLinear.from_factors(up.to(weight.dtype), down.to(weight.dtype),
                                           None if bias is None else bias.detach())
    factored.requires_grad_(weight.requires_grad)
    return factored.train(layer.training if isinstance(layer, nn.Module) else True)


def run_batch(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(*batch) if isinstance(batch, (tuple, list)) else model(batch)


def calibration_stats(model: nn.Module, layers: Mapping[str, nn.Linear], batches: Iterable[Any], method: str,
                      loss: LossFn | None = None) -> dict[str, Tensor]:
    """Each layer's statistic for ``method`` over ``batches`` (the model in eval mode): ``"activation"``: the Gram
    matrix ``X^T X`` ``(d_in, d_in)`` of its inputs; ``"fisher"``: the ``(d_out,)`` row sums of the squared gradients
    of ``loss(model, batch)`` (default: the output's ``.loss``), summed over batches (batches of one example give
    FWSVD's empirical Fisher)."""
    require(method in ("activation", "fisher"), "method", method, "only 'activation' and 'fisher' use calibration")
    stats: dict[str, Tensor] = {}
    seen: dict[int, tuple[Tensor, Tensor]] = {}  # id(input) -> (input kept alive, its Gram): q/k/v share theirs

    def gram_hook(path: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0]
            if id(x) not in seen:
                flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, d_in)
                seen[id(x)] = (x, flat.T @ flat)
            stats[path] = seen[id(x)][1] + stats.get(path, 0.0)
        return hook

    was_training, grads = model.training, {p: p.requires_grad for p in model.parameters()}
    handles = [m.register_forward_pre_hook(gram_hook(path)) for path, m in layers.items()] \
        if method == "activation" else []
    model.eval()
    try:
        if method == "fisher":
            model.requires_grad_(False)
            for m in layers.values():
                m.weight.requires_grad_(True)
        count = 0
        for batch in batches:
            count += 1
            with torch.set_grad_enabled(method == "fisher"):
                value = loss(model, batch) if loss is not None else run_batch(model, batch).loss
            seen.clear()
            if method == "fisher":
                value.backward()
                for path, m in layers.items():
                    grad = m.weight.grad if m.weight.grad is not None else torch.zeros_like(m.weight)
                    stats[path] = grad.float().pow(2).sum(1) + stats.get(path, 0.0)  # (d_out,)
                    m.weight.grad = None
        require(count > 0, "calibration", "no batches", f"method {method!r} needs at least one calibration batch")
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in grads.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return stats
