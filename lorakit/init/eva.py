"""EVA (Paischer et al., 2024; METHODS.md entry 22): explained-variance initialisation with rank redistribution.

For each layer, the inputs ``X`` (all tokens of the given batches, ``(n, d_in)``) have the SVD ``X = U S V^T``.
``A`` takes the top right-singular vectors (rows of ``V^T``), ``B = 0`` (so the output is unchanged). Ranks are
redistributed across layers: every layer offers its top ``rho * r`` components with explained-variance ratios
``S_i^2 / sum_j S_j^2``; the ``sum(r)`` components with the largest ratios win (the total budget of the config
stays fixed); a layer that wins none is left without an adapter. The scale ``alpha / r`` of each layer is kept
(PEFT's ``adjust_scaling_factors``). With ``whiten=True`` each row of ``A`` is divided by its singular value
``S_i``, so the projected inputs ``A x`` of the given data have identity second moment (PEFT's ``whiten``).

lorakit accumulates the Gram matrix ``X^T X`` (``(d_in, d_in)``; one per input shared by several layers) and takes
its eigendecomposition: the same right singular vectors as the stacked ``X``, exact and deterministic, instead of
the paper's incremental SVD with early stopping (PEFT's ``IncrementalPCA`` also centres the data; EVA's paper and
lorakit do not). ``niter=N`` computes only the top ``rho * r`` eigenpairs, by seeded randomized subspace iteration
(Halko et al., 2011) with ``N`` power iterations, the analogue of PiSSA's fast SVD: for a ``d_in`` of 1536 it is ~8x
faster than the full ``eigh``; the ratios' denominator is then the trace, the sum of all eigenvalues.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import require
from .linalg import top_svd
from .registry import Factors, LayerInfo, register_init


def allocate(ratios: dict[str, Tensor], budget: int, caps: dict[str, int]) -> dict[str, int]:
    """Ranks per layer: the ``budget`` largest ratios over all layers, at most ``caps[path]`` from one layer."""
    offers = [(-float(v), path, i) for path, rs in ratios.items() for i, v in enumerate(rs[: caps[path]].tolist())]
    ranks = dict.fromkeys(ratios, 0)
    for _, path, _ in sorted(offers)[:budget]:
        ranks[path] += 1
    return ranks


def _combine(summaries: dict[str, tuple[Tensor, Tensor]], layers: dict[str, LayerInfo],
             rho: float = 2.0, **_: object) -> dict[str, Factors]:
    budget = sum(layer.r for layer in layers.values())
    caps = {p: int(round(rho * layers[p].r)) for p in summaries}
    ranks = allocate({p: ratio for p, (_, ratio) in summaries.items()}, budget, caps)
    return {p: Factors(b=vecs.new_zeros(layers[p].rows, ranks[p]), a=vecs[: ranks[p]].clone())
            for p, (vecs, _) in summaries.items() if ranks[p] > 0}


@register_init("eva", statistic="inputs", options={"rho": 2.0, "whiten": False, "niter": None}, combine=_combine)
def eva(gram: Tensor, layer: LayerInfo, rho: float = 2.0, whiten: bool = False,
        niter: int | None = None) -> tuple[Tensor, Tensor]:
    """One layer's offer: its top ``rho * r`` right singular vectors ``(k, d_in)`` (divided by their singular
    values when ``whiten``) and their explained-variance ratios (exact, or randomized with ``niter`` iterations)."""
    require(rho >= 1.0, "init_options['rho']", rho, "must be >= 1")
    require(isinstance(whiten, bool), "init_options['whiten']", whiten, "must be True or False")
    require(niter is None or (isinstance(niter, int) and not isinstance(niter, bool) and niter >= 1),
            "init_options['niter']", niter, "must be None (exact) or a positive number of power iterations")
    k = min(int(round(rho * layer.r)), gram.shape[0])
    if niter is None:
        eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending; (d_in,), (d_in, d_in)
        eigvals = eigvals.flip(0).clamp_min(0)
        vecs, total = eigvecs.flip(1)[:, :k].t(), eigvals.sum()  # (k, d_in)
    else:
        _, eigvals, vecs = top_svd(gram, k, niter=niter)  # a PSD matrix: singular pairs are eigenpairs
        total = gram.diagonal().sum()
    if whiten:
        singular = eigvals[:k].sqrt()
        require(bool((singular > 0).all()), "init_options['whiten']", whiten,
                f"needs {k} non-zero singular values of {layer.path!r}'s inputs; give more data or lower r / rho")
        vecs = vecs / singular[:, None]
    return vecs, eigvals[:k] / total
