"""LoRA-LEGO (lorakit.merging.lego): the rank-wise unit algebra (concatenation = summation, permutation invariance),
the clustered merge (exact at full rank, order-independent, recovers shared units whatever their scale and sign),
its dual reweighting, and its argument checks."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lorakit.errors import LorakitError
from lorakit.merging.lego import cluster_units, lego_merge, rank_units

D_OUT, D_IN = 12, 10


def lora(r: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    return torch.randn(D_OUT, r, generator=gen, dtype=dtype), torch.randn(r, D_IN, generator=gen, dtype=dtype)


def loras(ranks: tuple[int, ...] = (2, 3, 4), seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [lora(r, gen) for r in ranks]


def weighted_sum(factors: list[tuple[Tensor, Tensor]], weights: list[float]) -> Tensor:
    return sum(w * b @ a for (b, a), w in zip(factors, weights))


def permuted(b: Tensor, a: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    p = torch.randperm(b.shape[1], generator=gen)
    return b[:, p], a[p]


def pooled(factors: list[tuple[Tensor, Tensor]], weights: list[float]) -> tuple[Tensor, Tensor]:
    units = [rank_units(b, a) for b, a in factors]
    return torch.cat([ub * w for (ub, _), w in zip(units, weights)]), torch.cat([ua for _, ua in units])


WEIGHTS = [0.5, -1.5, 2.0]


def test_concatenated_units_sum_the_weighted_loras() -> None:
    factors = loras()
    ub, ua = rank_units(*factors[1])
    assert ub.shape == (3, D_OUT) and ua.shape == (3, D_IN) and torch.equal(ub.T @ ua, factors[1][0] @ factors[1][1])
    ub, ua = pooled(factors, WEIGHTS)
    assert ub.shape == (9, D_OUT) and torch.allclose(ub.T @ ua, weighted_sum(factors, WEIGHTS), atol=1e-12)


def test_merge_ignores_the_order_of_ranks_and_of_loras() -> None:
    factors, gen = loras(), torch.Generator().manual_seed(1)
    shuffled = [permuted(b, a, gen) for b, a in factors][::-1]
    for reweight in ("none", "dual"):
        b1, a1 = lego_merge(factors, WEIGHTS, 4, reweight=reweight)
        b2, a2 = lego_merge(shuffled, WEIGHTS[::-1], 4, reweight=reweight)
        assert torch.allclose(b1 @ a1, b2 @ a2, atol=1e-10)
        assert torch.allclose(b1, b2, atol=1e-10) and torch.allclose(a1, a2, atol=1e-10)  # same units, same order


@pytest.mark.parametrize("reweight", ["none", "parameter", "output", "dual"])
def test_merge_at_full_rank_is_the_weighted_sum(reweight: str) -> None:
    factors = [(b.float(), a.float()) for b, a in loras()]
    b, a = lego_merge(factors, WEIGHTS, 9, reweight=reweight)
    assert b.shape == (D_OUT, 9) and a.shape == (9, D_IN) and b.dtype == torch.float32
    assert torch.allclose(b @ a, weighted_sum(factors, WEIGHTS), atol=1e-4)
    b, a = lego_merge(factors, WEIGHTS, 12, reweight=reweight)  # more ranks than units: zero units pad
    assert b.shape == (D_OUT, 12) and torch.allclose(b @ a, weighted_sum(factors, WEIGHTS), atol=1e-4)
    assert (b.norm(dim=0) > 0).sum() == 9


def test_zero_units_are_left_out() -> None:
    factors = loras((2, 3))
    fresh = (torch.zeros(D_OUT, 4, dtype=torch.float64), torch.randn(4, D_IN, dtype=torch.float64))  # untrained: B = 0
    assert (cluster_units(*pooled([fresh] + factors, [1.0] * 3), 3) == -1).sum() == 4
    b, a = lego_merge([fresh] + factors, None, 5)
    assert torch.allclose(b @ a, weighted_sum(factors, [1.0, 1.0]), atol=1e-10)
    b, a = lego_merge([fresh], None, 2)
    assert b.shape == (D_OUT, 2) and not b.any() and not a.any()


def test_shared_units_are_recovered_whatever_their_scale_and_sign() -> None:
    gen = torch.Generator().manual_seed(2)
    planted_b, planted_a = lora(3, gen)  # three units both LoRAs hold, each rescaled by c in +-[0.1, 10]
    factors = []
    for _ in range(2):
        c = torch.exp(torch.empty(3, dtype=torch.float64).uniform_(-2.3, 2.3, generator=gen))
        c = c * (torch.randint(0, 2, (3,), generator=gen) * 2 - 1)
        noisy_b = (planted_b + 0.01 * torch.randn(D_OUT, 3, generator=gen, dtype=torch.float64)) * c
        factors.append(permuted(noisy_b, planted_a / c[:, None], gen))
    b, a = lego_merge(factors, [1.0, 0.5], 3, reweight="none")
    merged = torch.stack([torch.outer(b[:, j], a[j]).flatten() for j in range(3)])
    planted = torch.stack([torch.outer(planted_b[:, k], planted_a[k]).flatten() for k in range(3)])
    cosine = torch.nn.functional.normalize(merged, dim=1) @ torch.nn.functional.normalize(planted, dim=1).T
    best = cosine.max(1)
    assert (best.values > 0.99).all() and sorted(best.indices.tolist()) == [0, 1, 2]
    assert torch.allclose(merged.norm(dim=1), 1.5 * planted[best.indices].norm(dim=1), rtol=0.05)


def test_output_reweighting_restores_the_frobenius_norm() -> None:
    factors = loras(seed=3)
    target = weighted_sum(factors, WEIGHTS).norm()
    for reweight in ("output", "dual"):
        b, a = lego_merge(factors, WEIGHTS, 3, reweight=reweight)
        assert torch.allclose((b @ a).norm(), target, rtol=1e-10)
    b, a = lego_merge(factors, WEIGHTS, 3, reweight="none")
    assert (b @ a).norm() < 0.95 * target  # so the check above is not vacuous


def test_parameter_reweighting_gives_each_unit_its_members_magnitude() -> None:
    factors = loras((4, 4, 4), seed=4)
    ub, ua = pooled(factors, WEIGHTS)
    labels = cluster_units(ub, ua, 3, iters=50, seed=0)
    members = torch.stack([(ub.norm(dim=1) * ua.norm(dim=1))[labels == c].sum() for c in range(3)])
    grouped = torch.bincount(labels) >= 2
    assert grouped.any()  # real clusters, not only singletons
    b, a = lego_merge(factors, WEIGHTS, 3, reweight="parameter")
    assert torch.allclose(b.norm(dim=0) * a.norm(dim=1), members, rtol=1e-10)
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1), rtol=1e-10)
    bn, an = lego_merge(factors, WEIGHTS, 3, reweight="none")
    shrunk = bn.norm(dim=0) * an.norm(dim=1)  # members that do not align cancel: what the reweighting restores
    assert (shrunk[grouped] < members[grouped]).all() and torch.allclose(shrunk[~grouped], members[~grouped])
    bd, ad = lego_merge(factors, WEIGHTS, 3, reweight="dual")  # parameter ratios, output norm
    dual = bd.norm(dim=0) * ad.norm(dim=1)
    assert torch.allclose(dual / dual.sum(), members / members.sum(), rtol=1e-10)


def test_merge_is_seeded_and_keeps_the_dtype() -> None:
    factors = loras((3, 3, 3), seed=5)
    assert all(torch.equal(x, y) for x, y in zip(lego_merge(factors, None, 4), lego_merge(factors, None, 4)))
    b, a = lego_merge([(b.bfloat16(), a.bfloat16()) for b, a in factors], None, 4)
    assert b.dtype == a.dtype == torch.bfloat16


GOOD = loras((2, 3))


@pytest.mark.parametrize("factors, weights, rank, options, field", [
    ([], None, 2, {}, "factors"),
    ([GOOD[0], (torch.randn(D_OUT + 1, 3), torch.randn(3, D_IN))], None, 2, {}, "factors"),
    ([GOOD[0], (torch.randn(D_OUT, 3), torch.randn(3, D_IN + 1))], None, 2, {}, "factors"),
    ([(torch.randn(D_OUT, 3), torch.randn(2, D_IN))], None, 2, {}, "factors"),
    (GOOD, None, 0, {}, "rank"),
    (GOOD, None, 2.5, {}, "rank"),
    (GOOD, [1.0, float("nan")], 2, {}, "weights"),
    (GOOD, [1.0], 2, {}, "weights"),
    (GOOD, None, 2, {"reweight": "both"}, "reweight"),
    (GOOD, None, 2, {"iters": -1}, "iters"),
])
def test_bad_arguments_are_refused(factors: list, weights: list | None, rank: int, options: dict, field: str) -> None:
    with pytest.raises(LorakitError, match=f"^{field}="):
        lego_merge(factors, weights, rank, **options)
