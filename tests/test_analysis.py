"""lorakit.analysis: update spectra, subspace similarity, intruder dimensions, robust AltMin, LoRA's norm limits, plots.

References are the obvious slow computations: dense SVDs of merged-minus-base weights, hand-written entropies,
constructed matrices whose singular vectors are known.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from zoo import tiny_llama

import lorakit
from lorakit.analysis import (
    NormMonitor,
    adapter_similarity,
    complete,
    dense_update,
    effective_rank,
    intruder_dimensions,
    layer_updates,
    mitigate,
    model_intruders,
    norm_report,
    plot_intruders,
    plot_spectra,
    principal_angles,
    singular_values,
    spectrum_report,
    subspace_similarity,
)
from lorakit.errors import LorakitError
from lorakit.hooks import HookList

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)).Q


def _merged_deltas(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The reference update of each layer: its weight after ``lorakit.merge`` minus before."""
    layers = [h for h in lorakit.inject.hosts(model) if name in h.adapters]
    before = {h.path: h.backend.weight().detach().clone() for h in layers}
    lorakit.merge(model, [name])
    deltas = {h.path: h.backend.weight().detach() - before[h.path] for h in layers}
    lorakit.unmerge(model)
    return deltas


@pytest.fixture
def adapted() -> torch.nn.Module:
    model = tiny_llama()
    lorakit.adapt(model, lorakit.LoraConfig(r=3, alpha=6.0, targets=["q_proj", "v_proj"], init="random"), "lora")
    lorakit.adapt(model, lorakit.build_config("kron", targets=["o_proj"]), "kron")  # no factors(): dense updates
    with torch.no_grad():
        for p in lorakit.trainable_parameters(model, "kron").values():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def test_effective_rank_is_exp_of_the_entropy_of_the_normalised_spectrum() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    p = [3 / 6, 2 / 6, 1 / 6]
    assert effective_rank(s) == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert effective_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    with pytest.raises(LorakitError, match="non-negative"):
        effective_rank(torch.tensor([1.0, -1.0]))


def test_layer_updates_and_spectra_equal_the_merged_weight_differences(adapted: torch.nn.Module) -> None:
    for name, rank, layers in (("lora", 3, 4), ("kron", None, 2)):
        updates, reference = layer_updates(adapted, name), _merged_deltas(adapted, name)
        assert set(updates) == set(reference) and len(updates) == layers
        for path, update in updates.items():
            assert isinstance(update, tuple) == (name == "lora")  # factors when the method has them
            torch.testing.assert_close(dense_update(update), reference[path], atol=1e-5, rtol=1e-4)
        for layer in spectrum_report(adapted, name):
            s = torch.linalg.svdvals(reference[layer.path].double())
            torch.testing.assert_close(layer.singular_values.double(), s[: rank or s.numel()], atol=1e-4, rtol=1e-4)
            p = s[s > 1e-6 * s[0]] / s[s > 1e-6 * s[0]].sum()
            assert layer.effective_rank == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-3)
            assert layer.frobenius_norm == pytest.approx(float(reference[layer.path].norm()), rel=1e-4)
    with pytest.raises(LorakitError, match="unknown adapter 'nope'"):
        layer_updates(adapted, "nope")


def test_factored_singular_values_match_the_dense_ones() -> None:
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(40, 4, generator=g), torch.randn(4, 24, generator=g)
    dense = torch.linalg.svdvals((up @ down).double())
    torch.testing.assert_close(singular_values((up, down)).double(), dense[:4], rtol=1e-4, atol=1e-4)
    with pytest.raises(LorakitError, match=r"\(d_out, r\) and \(r, d_in\)"):
        singular_values((up, down.t()))


def test_principal_angles_and_subspace_similarity_of_known_subspaces() -> None:
    theta = 0.7
    e = torch.eye(3, dtype=F64)
    a = e[:, :2]  # span(e1, e2)
    b = torch.stack([e[:, 0], math.cos(theta) * e[:, 1] + math.sin(theta) * e[:, 2]], dim=1)
    torch.testing.assert_close(principal_angles(a, 3.0 * b), torch.tensor([1.0, math.cos(theta)], dtype=F64))
    w = torch.diag(torch.tensor([5.0, 2.0], dtype=F64))  # updates whose left singular vectors are a and b
    update_a, update_b = (a @ w, e[:2]), (b @ w, e[:2])  # (3, 2), (2, 3)
    assert subspace_similarity(update_a, update_b, 2) == pytest.approx((1 + math.cos(theta) ** 2) / 2)
    assert subspace_similarity(update_a, update_b, 1) == pytest.approx(1.0)  # both top vectors are e1
    assert subspace_similarity(a @ a.t(), 7.0 * a @ a.t(), 2) == pytest.approx(1.0)  # dense, scale-free
    assert subspace_similarity(e[:, :1] @ e[:1], e[:, 2:] @ e[2:], 1) == pytest.approx(0.0)  # orthogonal
    assert math.isnan(subspace_similarity(torch.zeros(3, 3), a @ a.t(), 2))  # a zero update has no subspace
    with pytest.raises(LorakitError, match="k=0"):
        subspace_similarity(update_a, update_b, 0)


def test_an_adapter_is_fully_similar_to_itself_and_less_to_another(adapted: torch.nn.Module) -> None:
    lorakit.adapt(adapted, lorakit.LoraConfig(r=3, targets=["q_proj", "v_proj"], init="random"), "other")
    same, other = adapter_similarity(adapted, "lora", "lora", 3), adapter_similarity(adapted, "lora", "other", 3)
    assert set(same) == set(other) == set(layer_updates(adapted, "lora"))
    assert all(v == pytest.approx(1.0) for v in same.values())
    assert all(0.0 <= v < 0.9 for v in other.values())  # two random 3-d subspaces of R^32 barely overlap


def _rank_deficient_base() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W0`` (48, 40) of rank 32 with known singular vectors: the first 32 columns of ``q_out`` and ``q_in``."""
    q_out, q_in = _orthogonal(48, 2), _orthogonal(40, 3)
    w0 = q_out[:, :32] * torch.linspace(20, 1, 32, dtype=F64) @ q_in[:, :32].t()
    return w0, q_out, q_in


def test_an_update_orthogonal_to_the_base_adds_exactly_one_intruder_and_mitigation_removes_it() -> None:
    w0, q_out, q_in = _rank_deficient_base()
    inside = q_out[:, :4] * torch.tensor([2.0, 1.5, 1.0, 0.5], dtype=F64) @ q_in[:, :4].t()  # in the top subspace
    intruder = 50.0 * q_out[:, 40:41] @ q_in[:, 35:36].t()  # u, v outside W0's column / row spaces
    w = w0 + inside + intruder
    report = intruder_dimensions(w0, w, k=10, epsilon=0.5)
    assert report.indices.tolist() == [0] and report.count == 1
    assert float(report.singular_values[0]) == pytest.approx(50.0)
    assert float(report.max_cosines[0]) < 1e-6 and bool((report.max_cosines[1:] > 1 - 1e-6).all())
    assert intruder_dimensions(w0, w0 + inside, k=10).count == 0  # an update inside the top subspace: none
    up, down = mitigate(w0, w, report, scale=0.0)
    assert up.shape == (48, 5) and down.shape == (5, 40)  # the rank of w - w0
    torch.testing.assert_close(up @ down, inside, atol=1e-8, rtol=0)  # the rest of dW is unchanged
    assert intruder_dimensions(w0, w0 + up @ down, k=10).count == 0
    half_up, half_down = mitigate(w0, w, report, scale=0.5)
    torch.testing.assert_close(half_up @ half_down, inside + intruder / 2, atol=1e-8, rtol=0)
    with pytest.raises(LorakitError, match="another matrix"):
        mitigate(w0, 2 * w, report)
    with pytest.raises(LorakitError, match="scale=1.5"):
        mitigate(w0, w, report, scale=1.5)


def test_a_spread_direction_in_a_full_rank_base_is_an_intruder() -> None:
    q_out, q_in = _orthogonal(48, 4), _orthogonal(40, 5)
    w0 = q_out[:, :40] * torch.linspace(20, 1, 40, dtype=F64) @ q_in.t()  # full rank
    u, v = q_out[:, 30:40].sum(1, keepdim=True) / 10**0.5, q_in[:, 30:40].sum(1, keepdim=True) / 10**0.5
    report = intruder_dimensions(w0, w0 + 50.0 * u @ v.t(), k=10, epsilon=0.5)
    assert report.indices.tolist() == [0]  # max |cos| ~ 1 / sqrt(10) with the base's vectors
    assert 0.2 < float(report.max_cosines[0]) < 0.5


def test_model_intruders_of_an_adapter_match_the_merged_weights() -> None:
    model = tiny_llama()
    lorakit.adapt(model, lorakit.LoraConfig(r=2, alpha=200.0, targets=["q_proj", "v_proj"], init="random"), "a")
    found = model_intruders(model, "a", k=6, epsilon=0.5)
    before = {h.path: h.backend.weight().detach().clone() for h in lorakit.inject.hosts(model)}
    lorakit.merge(model, ["a"])
    reference = {h.path: intruder_dimensions(before[h.path], h.backend.weight().detach(), k=6).count
                 for h in lorakit.inject.hosts(model)}
    assert found.counts == reference and found.total == sum(reference.values()) > 0
    with pytest.raises(LorakitError, match="merged"):
        model_intruders(model, "a")
    with pytest.raises(LorakitError, match="not both"):
        model_intruders(model, "a", base_model=model)


def test_model_intruders_of_a_fully_fine_tuned_model_against_its_base() -> None:
    base = tiny_llama()
    tuned = copy.deepcopy(base)
    weight = tuned.model.layers[1].mlp.down_proj.weight  # (32, 64)
    u0, _, v0h = torch.linalg.svd(weight.detach(), full_matrices=False)
    u, v = u0[:, 24:].sum(1) / 8**0.5, v0h[24:].sum(0) / 8**0.5  # spread over the 8 weakest directions
    with torch.no_grad():
        weight += 30.0 * torch.outer(u, v)
    found = model_intruders(tuned, base_model=base, k=5)
    path = "model.layers.1.mlp.down_proj"
    assert list(found.layers) == [path]  # every other layer is equal and left out
    reference = intruder_dimensions(base.model.layers[1].mlp.down_proj.weight.detach(), weight.detach(), k=5)
    assert found.counts == {path: reference.count} and found.total == 1


def _low_rank_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(50, 3, generator=g, dtype=F64) @ torch.randn(3, 40, generator=g, dtype=F64)  # incoherent
    return m, torch.rand(50, 40, generator=g) < 0.4


def test_altmin_recovers_a_rank_3_matrix_from_40_percent_of_its_entries() -> None:
    m, mask = _low_rank_problem()
    u, v = complete(m, mask, rank=3, iters=100)
    assert u.shape == (50, 3) and v.shape == (40, 3)
    assert float((u @ v.t() - m).norm() / m.norm()) < 1e-3  # unobserved entries included
    noisy_u, noisy_v = complete(m, mask, rank=3, iters=100, update_noise=0.3, seed=1)
    assert not torch.allclose(noisy_u @ noisy_v.t(), u @ v.t(), atol=1e-9)  # the noise did perturb the iterates
    assert float((noisy_u @ noisy_v.t() - m).norm() / m.norm()) < 1e-2


def test_altmin_refuses_bad_inputs_clearly() -> None:
    m, mask = _low_rank_problem()
    with pytest.raises(LorakitError, match=r"rank=41 is invalid: must be an integer in \[1, 40\]"):
        complete(m, mask, rank=41)
    with pytest.raises(LorakitError, match="mask.*shape"):
        complete(m, mask[:, :30], rank=3)
    sparse_row = mask.clone()
    sparse_row[7] = False
    with pytest.raises(LorakitError, match="row 7.*lam > 0"):
        complete(m, sparse_row, rank=3)
    u, v = complete(m, sparse_row, rank=3, lam=1e-3, iters=5)  # the ridge makes the empty row solvable (zero)
    assert float(u[7].abs().max()) == 0.0


def test_norm_report_and_monitor_equal_direct_computations(adapted: torch.nn.Module) -> None:
    ids = torch.randint(0, 96, (2, 7))
    seen: dict[str, float] = {}
    layers = [h for h in lorakit.inject.hosts(adapted) if "lora" in h.adapters]
    handles = [h.base_layer.register_forward_hook(
        lambda mod, args, out, path=h.path: seen.__setitem__(path, float(args[0].reshape(-1, 32).norm(dim=1).max())))
        for h in layers]
    report = norm_report(adapted, "lora", lambda m: m(ids))
    for handle in handles:
        handle.remove()
    deltas = _merged_deltas(adapted, "lora")
    assert [r.path for r in report] == [h.path for h in layers]
    for row, host in zip(report, layers):
        assert row.input_norm == pytest.approx(seen[row.path], rel=1e-5)
        assert row.weight_norm == pytest.approx(float(torch.linalg.matrix_norm(host.base_layer.weight, 2)), rel=1e-5)
        assert row.update_norm == pytest.approx(float(torch.linalg.matrix_norm(deltas[row.path], 2)), rel=1e-4)
        assert row.bound == pytest.approx(row.input_norm * (row.weight_norm + row.update_norm))
    monitor = NormMonitor("lora")
    hooks = HookList([monitor])
    hooks.on_train_begin(adapted, torch.optim.SGD(lorakit.trainable_parameters(adapted).values(), lr=0.1))
    for step, batch in enumerate((ids, ids[:1, :2])):  # a smaller second batch: maxima are per step
        hooks.before_forward(adapted, step)
        adapted(batch)
        logged = hooks.metrics()
    small = norm_report(adapted, "lora", lambda m: m(ids[:1, :2]))
    for row in small:
        for q in ("input_norm", "weight_norm", "update_norm", "bound"):
            assert logged[f"limits/{row.path}/{q}"] == pytest.approx(getattr(row, q), rel=1e-5)
    assert logged["limits/max_bound"] == pytest.approx(max(r.bound for r in small))
    monitor.remove()
    assert not any(h._forward_pre_hooks for h in layers)


def test_plots_write_non_blank_pngs(adapted: torch.nn.Module, tmp_path) -> None:
    from matplotlib.image import imread

    spectra_png = plot_spectra(spectrum_report(adapted, "lora"), tmp_path / "s.png")
    counts_png = plot_intruders({"a": 2, "b": 0}, tmp_path / "i.png")
    for png in (spectra_png, counts_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(torch.from_numpy(imread(png)).reshape(-1, 4).unique(dim=0)) > 10  # something was drawn
    with pytest.raises(LorakitError, match="at least one layer"):
        plot_intruders({}, tmp_path / "none.png")
