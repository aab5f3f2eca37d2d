"""Federated LoRA aggregators (lorakit.federated.aggregators): the exact ones reproduce ``sum_k p_k s_k B_k A_k``
(checked against the dense float64 formula), FedAvg shows its cross terms, Fed-SB's upload does not grow with K,
FedSVD's re-basis keeps the update and orthonormalises A, LoRA-FAIR's correction is the least-squares one, bad
uploads are refused with the client and role named, and every registered aggregator keeps the contract."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lorakit.errors import ConfigError
from lorakit.federated.aggregators import (
    AGGREGATORS,
    LOW_RANK,
    LayerResult,
    LayerRound,
    aggregation_error,
    check_uploads,
    client_update,
    global_update,
    ideal_update,
)

D_OUT, D_IN, RANK, ALPHA = 12, 10, 4, 8.0
WEIGHTS = [5.0, 3.0, 2.0]  # unequal, normalised by LayerRound.p


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype)


def make_round(name: str, k: int = 3, seed: int = 0, ranks: list[int] | None = None, dtype: torch.dtype = torch.float64,
               **options: object) -> LayerRound:
    """A random round of the method ``name``'s clients train (a fresh aggregator's clients: ranks 2/4/8)."""
    agg, gen = AGGREGATORS.get(name), torch.Generator().manual_seed(seed)
    current = {"A": randn(gen, RANK, D_IN, dtype=dtype), "B": randn(gen, D_OUT, RANK, dtype=dtype)}
    if agg.method == "lora-xs":
        current["R"] = randn(gen, RANK, RANK, dtype=dtype)
    if ranks is None:
        ranks = [[2, 4, 8][i % 3] for i in range(k)] if agg.fresh else [RANK] * k
    clients = []
    for r in ranks:
        full = {"A": randn(gen, r, D_IN, dtype=dtype), "B": randn(gen, D_OUT, r, dtype=dtype),
                "R": randn(gen, r, r, dtype=dtype)}
        clients.append({role: full[role] for role in agg.sends})
    weights = (WEIGHTS * k)[:k]
    return LayerRound(current, clients, weights, [ALPHA / r for r in ranks], ALPHA / RANK, options=options)


def reference(layer: LayerRound) -> Tensor:
    """``sum_k p_k s_k B_k (R_k) A_k`` in float64, the obvious dense way."""
    total = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    p = [w / sum(layer.weights) for w in layer.weights]
    for p_k, s_k, upload in zip(p, layer.scales, layer.clients):
        roles = {name: t.double() for name, t in {**layer.current, **upload}.items()}
        core = roles["R"] if "R" in roles else torch.eye(roles["B"].shape[1], dtype=torch.float64)
        total += p_k * s_k * roles["B"] @ core @ roles["A"]
    return total


def dense(factors: tuple[Tensor, Tensor]) -> Tensor:
    return factors[0].double() @ factors[1].double()


def run(name: str, layer: LayerRound) -> LayerResult:
    return AGGREGATORS.get(name).fn(layer)


def close(x: Tensor, y: Tensor, tol: float = 1e-5) -> bool:
    return float((x.double() - y.double()).norm() / y.double().norm()) < tol


EXACT = [n for n in AGGREGATORS.names() if AGGREGATORS.get(n).exact]


def test_registry_holds_the_papers_and_not_fedprox() -> None:
    assert set(AGGREGATORS.names()) == {"fedavg", "ffa-lora", "fed-sb", "flora", "fedsvd", "lora-fair"}
    assert set(EXACT) == {"ffa-lora", "fed-sb", "flora", "fedsvd"}
    with pytest.raises(ConfigError, match="fedavg"):
        AGGREGATORS.get("fedprox")


@pytest.mark.parametrize("name", EXACT)
def test_exact_aggregators_match_the_dense_weighted_sum(name: str) -> None:
    layer = make_round(name)
    result = run(name, layer)
    assert close(dense(ideal_update(layer)), reference(layer))
    assert close(dense(global_update(layer, result)), reference(layer))
    assert aggregation_error(layer, result) < 1e-5


def test_flora_stacks_heterogeneous_ranks_with_their_own_scales() -> None:
    layer = make_round("flora", ranks=[2, 4, 8])
    assert sorted(set(layer.scales)) == [ALPHA / 8, ALPHA / 4, ALPHA / 2]
    result = run("flora", layer)
    up, down = result.merged
    assert result.tensors == {} and up.shape == (D_OUT, 14) and down.shape == (14, D_IN)
    assert close(up @ down, reference(layer))


def test_fedavg_has_the_cross_terms() -> None:
    layer = make_round("fedavg")
    result = run("fedavg", layer)
    p = layer.p
    b_bar = sum(w * c["B"] for w, c in zip(p, layer.clients))
    a_bar = sum(w * c["A"] for w, c in zip(p, layer.clients))
    assert close(dense(global_update(layer, result)), layer.scale * b_bar @ a_bar)
    assert aggregation_error(layer, result) > 0.05


def test_fedavg_averages_other_roles_and_the_others_refuse_them() -> None:
    layer = make_round("fedavg")
    gen = torch.Generator().manual_seed(1)
    mags = [randn(gen, D_OUT) for _ in layer.clients]
    clients = [{**c, "magnitude": m} for c, m in zip(layer.clients, mags)]
    current = {**layer.current, "magnitude": torch.ones(D_OUT, dtype=torch.float64)}
    with_mag = LayerRound(current, clients, layer.weights, layer.scales, layer.scale)
    result = run("fedavg", with_mag)
    assert torch.allclose(result.tensors["magnitude"], sum(p * m for p, m in zip(with_mag.p, mags)), atol=1e-6)
    ffa = make_round("ffa-lora")
    bad = LayerRound({**ffa.current, "magnitude": current["magnitude"]},
                     [{**c, "magnitude": m} for c, m in zip(ffa.clients, mags)], ffa.weights, ffa.scales, ffa.scale)
    with pytest.raises(ConfigError, match=r"clients\[0\]\['magnitude'\]"):
        run("ffa-lora", bad)


def test_fed_sb_averages_the_core_and_uploads_r_squared_whatever_k() -> None:
    layer = make_round("fed-sb")
    result = run("fed-sb", layer)
    b, a = layer.current["B"], layer.current["A"]
    mean_of_updates = sum(p * b @ c["R"] @ a for p, c in zip(layer.p, layer.clients))
    assert close(b @ result.tensors["R"] @ a, mean_of_updates)
    for k in (2, 16):
        uploads = make_round("fed-sb", k=k).clients
        assert {sum(t.numel() for t in c.values()) for c in uploads} == {RANK * RANK}


def test_fedsvd_rebasis_orthonormalises_a_and_keeps_the_update() -> None:
    layer = make_round("fedsvd")
    result = run("fedsvd", layer)
    a_new, b_new = result.tensors["A"], result.tensors["B"]
    b_bar = sum(p * c["B"] for p, c in zip(layer.p, layer.clients))
    assert torch.allclose(a_new @ a_new.t(), torch.eye(RANK, dtype=a_new.dtype), atol=1e-5)
    assert close(b_new @ a_new, b_bar @ layer.current["A"])


def test_fedsvd_every_two_rounds_leaves_a_alone_in_odd_rounds() -> None:
    odd = make_round("fedsvd", every=2)
    result = run("fedsvd", odd)
    b_bar = sum(p * c["B"] for p, c in zip(odd.p, odd.clients))
    assert set(result.tensors) == {"B"} and torch.allclose(result.tensors["B"], b_bar, atol=1e-5)
    even = LayerRound(odd.current, odd.clients, odd.weights, odd.scales, odd.scale, round=2, options={"every": 2})
    assert set(run("fedsvd", even).tensors) == {"A", "B"}


def test_lora_fair_beats_fedavg_and_is_least_squares_as_lam_vanishes() -> None:
    layer = make_round("lora-fair", lam=0.0)
    result = run("lora-fair", layer)
    assert aggregation_error(layer, result) <= aggregation_error(layer, run("fedavg", layer))
    p = layer.p
    a_bar = sum(w * c["A"] for w, c in zip(p, layer.clients))
    b_bar = sum(w * c["B"] for w, c in zip(p, layer.clients))
    d_b = (reference(layer) / layer.scale - b_bar @ a_bar) @ torch.linalg.pinv(a_bar)
    assert close(result.tensors["B"], b_bar + d_b, tol=1e-4)
    assert close(result.tensors["A"], a_bar)


def test_lora_fair_is_exact_when_the_ideal_lies_in_the_row_space_of_a_bar() -> None:
    layer = make_round("lora-fair")
    shared = [{"A": layer.clients[0]["A"], "B": c["B"]} for c in layer.clients]
    same_a = LayerRound(layer.current, shared, layer.weights, layer.scales, layer.scale)
    assert aggregation_error(same_a, run("lora-fair", same_a)) < 1e-5


def test_bad_uploads_name_the_client_and_the_role() -> None:
    ffa = make_round("ffa-lora")
    with_a = [c if k != 1 else {**c, "A": ffa.current["A"]} for k, c in enumerate(ffa.clients)]
    with pytest.raises(ConfigError, match=r"clients\[1\]\['A'\].*ffa-lora"):
        run("ffa-lora", LayerRound(ffa.current, with_a, ffa.weights, ffa.scales, ffa.scale))
    sb = make_round("fed-sb")
    wide = [c if k != 2 else {"R": torch.zeros(RANK, RANK + 1)} for k, c in enumerate(sb.clients)]
    with pytest.raises(ConfigError, match=r"clients\[2\]\['R'\]=\(4, 5\).*\(4, 4\)"):
        run("fed-sb", LayerRound(sb.current, wide, sb.weights, sb.scales, sb.scale))
    avg = make_round("fedavg")
    missing = [{"B": c["B"]} for c in avg.clients]
    with pytest.raises(ConfigError, match=r"clients\[0\]\['A'\]='missing'"):
        run("fedavg", LayerRound(avg.current, missing, avg.weights, avg.scales, avg.scale))


def test_flora_ranks_may_differ_but_a_and_b_must_agree_and_fit_the_layer() -> None:
    layer = make_round("flora", ranks=[2, 4, 8])
    mismatched = [{**c, "A": torch.zeros(3, D_IN)} if k == 1 else c for k, c in enumerate(layer.clients)]
    with pytest.raises(ConfigError, match=r"clients\[1\]\['A'\]=\(3, 10\).*\(4, 10\)"):
        run("flora", LayerRound(layer.current, mismatched, layer.weights, layer.scales, layer.scale))
    narrow = [{**c, "B": torch.zeros(D_OUT - 1, 2)} if k == 0 else c for k, c in enumerate(layer.clients)]
    with pytest.raises(ConfigError, match=r"clients\[0\]\['B'\]"):
        run("flora", LayerRound(layer.current, narrow, layer.weights, layer.scales, layer.scale))


def test_bad_weights_are_refused() -> None:
    layer = make_round("fedavg")
    with pytest.raises(ConfigError, match=r"weights.*3 clients"):
        LayerRound(layer.current, layer.clients, [0.5, 0.5], layer.scales, layer.scale)
    with pytest.raises(ConfigError, match=r"weights\[1\].*client 1"):
        LayerRound(layer.current, layer.clients, [0.5, -0.1, 0.6], layer.scales, layer.scale)
    with pytest.raises(ConfigError, match="all be zero"):
        LayerRound(layer.current, layer.clients, [0.0, 0.0, 0.0], layer.scales, layer.scale)
    with pytest.raises(ConfigError, match=r"scales.*3 clients"):
        LayerRound(layer.current, layer.clients, layer.weights, [1.0], layer.scale)


def test_client_update_folds_the_scale_and_the_core() -> None:
    layer = make_round("fed-sb")
    up, down = client_update(layer, 1)
    roles = layer.current
    assert close(up @ down, layer.scales[1] * roles["B"] @ layer.clients[1]["R"] @ roles["A"])


def test_results_keep_the_dtype_of_the_server_tensors() -> None:
    for name in AGGREGATORS.names():
        layer = make_round(name, dtype=torch.bfloat16)
        result = run(name, layer)
        assert all(t.dtype == torch.bfloat16 for t in result.tensors.values())
        assert result.merged is None or all(t.dtype == torch.bfloat16 for t in result.merged)


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_contract(name: str) -> None:
    agg = AGGREGATORS.get(name)
    assert agg.name == name and agg.method in ("lora", "lora-fa", "lora-xs") and agg.summary
    assert agg.sends and set(agg.sends) <= set(LOW_RANK) and agg.summary in (agg.fn.__doc__ or "")
    layer = make_round(name)
    before = [{role: t.clone() for role, t in c.items()} for c in [layer.current, *layer.clients]]
    result = agg.fn(layer)
    assert all(torch.equal(t, b[role]) for c, b in zip([layer.current, *layer.clients], before)
               for role, t in c.items())  # inputs untouched
    assert (result.merged is not None) == agg.fresh
    for role, t in result.tensors.items():
        assert t.shape == layer.current[role].shape and t.dtype == layer.current[role].dtype
    error = aggregation_error(layer, result)
    assert error < 1e-5 if agg.exact else error > 1e-3
    order = [2, 0, 1]
    shuffled = LayerRound(layer.current, [layer.clients[i] for i in order], [layer.weights[i] for i in order],
                          [layer.scales[i] for i in order], layer.scale)
    assert close(dense(global_update(shuffled, agg.fn(shuffled))), dense(global_update(layer, result)))
    extra = next(role for role in LOW_RANK if role not in agg.sends)
    bad = [{**layer.clients[0], extra: torch.zeros(RANK, RANK)}, *layer.clients[1:]]
    with pytest.raises(ConfigError, match=rf"clients\[0\]\['{extra}'\]"):
        check_uploads(LayerRound(layer.current, bad, layer.weights, layer.scales, layer.scale), agg)
