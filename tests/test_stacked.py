"""Stacked path (S-LoRA / Punica BGMV): gathered slot products equal each row run alone, and the path choice."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_pool import row_alone, save_adapters
from zoo import tiny_llama

import lorakit
from lorakit.routing import stacked
from lorakit.routing.rows import RowRouting

IDS = torch.randint(0, 96, (6, 7), generator=torch.Generator().manual_seed(1))
MIXED = {  # heterogeneous ranks, targets and methods (all factorable), plus DoRA (not factorable) and lora_bias
    "r2": lorakit.LoraConfig(r=2, targets="all-linear"),
    "r8": lorakit.LoraConfig(r=8, alpha=4.0, targets=["q_proj", "v_proj", "down_proj"]),
    "xs": lorakit.LoraXsConfig(r=4, targets=["q_proj", "o_proj"]),
    "bone": lorakit.BoneConfig(r=4, targets=["k_proj"]),
    "dora": lorakit.DoraConfig(r=4, targets=["q_proj"]),
    "bias": lorakit.LoraConfig(r=2, lora_bias=True, targets=["v_proj"]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Module, lorakit.AdapterPool]:
    paths = save_adapters(tmp_path_factory.mktemp("adapters"), MIXED, seed=3)
    model, reference = tiny_llama(), tiny_llama()
    pool = lorakit.AdapterPool(model, capacity=len(MIXED))
    for name, path in paths.items():
        pool.register(name, path)
        lorakit.load_adapter(reference, path, name)
    return model, reference, pool


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Input shapes of the layers that ran the padded grid (rather than only per-slot products)."""
    seen: list[str] = []
    grid = stacked._grid

    def spy(x, *args):
        seen.append(x.shape)
        return grid(x, *args)

    monkeypatch.setattr(stacked, "_grid", spy)
    return seen


def expect_rows_alone(model: torch.nn.Module, reference: torch.nn.Module, names: list[str | None],
                      ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), lorakit.route(model, names):
        mixed = model(ids).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i : i + 1], row_alone(reference, ids[i : i + 1], name),
                                   atol=1e-5, rtol=1e-5)
    return mixed


@pytest.mark.parametrize("limit", [0, float("inf")], ids=["segments", "grid"])
@pytest.mark.parametrize("tokens", [1, 7], ids=["decode", "prefill"])
def test_mixed_batch_equals_each_row_alone(setup, calls, monkeypatch, limit, tokens):
    model, reference, _ = setup
    monkeypatch.setitem(stacked.GRID_RULES, "cpu", stacked.GridRule(limit, limit))
    expect_rows_alone(model, reference, ["bone", "r8", None, "xs", "r2", "r8"], IDS[:, :tokens])
    assert bool(calls) == bool(limit)  # the forced kernel was the one taken


def test_unfactorable_adapters_are_attached_and_mix_with_slot_adapters(setup, calls, monkeypatch):
    """DoRA (not factorable) and LoRA with a bias are resident as attached modules (segment path), the others only
    in slots; one batch mixes both kinds, on the same layers."""
    model, reference, pool = setup
    monkeypatch.setitem(stacked.GRID_RULES, "cpu", stacked.GridRule(float("inf"), float("inf")))
    assert sorted(lorakit.configs(model)) == ["bias", "dora"]
    assert pool.in_slots() == {"r2", "r8", "xs", "bone"}
    expect_rows_alone(model, reference, ["dora", "bias", "r2", "r8"], IDS[:4])
    assert len(calls) == sum(1 for h in lorakit.inject.hosts(model) if "r2" in h.stack.members)


def test_slot_adapters_pass_gradients_to_the_inputs(setup, monkeypatch):
    """Pool adapters are frozen, but the stacked path is differentiable in its input (e.g. for input saliency):
    the gradient of the mixed batch's loss w.r.t. the embeddings equals each row's alone, in train mode too."""
    model, reference, _ = setup
    monkeypatch.setitem(stacked.GRID_RULES, "cpu", stacked.GridRule(float("inf"), float("inf")))
    names = ["r2", "r8", None]
    embeds = model.get_input_embeddings()(IDS[:3, :2]).detach().requires_grad_(True)
    model.train()
    try:
        with lorakit.route(model, names):
            model(inputs_embeds=embeds).logits.square().sum().backward()
    finally:
        model.eval()
    for i, name in enumerate(names):
        alone = embeds[i : i + 1].detach().requires_grad_(True)
        if name is None:
            with lorakit.disable(reference):
                reference(inputs_embeds=alone).logits.square().sum().backward()
        else:
            lorakit.set_active(reference, name)
            reference(inputs_embeds=alone).logits.square().sum().backward()
        torch.testing.assert_close(embeds.grad[i : i + 1], alone.grad, atol=1e-4, rtol=1e-4)


def test_one_slot_adapter_for_every_row_equals_activating_it(setup, calls):
    model, reference, _ = setup
    with torch.no_grad(), lorakit.route(model, ["r8"] * 3):
        routed = model(IDS[:3]).logits
    lorakit.set_active(reference, "r8")
    with torch.no_grad():
        torch.testing.assert_close(routed, reference(IDS[:3]).logits, atol=1e-5, rtol=1e-5)
    assert calls  # 3 rows x 7 tokens <= the CPU rule's max_tokens: one slot's grid


def test_plan_sends_long_or_skewed_groups_alone_and_the_rest_to_the_grid(monkeypatch):
    monkeypatch.setitem(stacked.GRID_RULES, "cpu", stacked.GridRule(4, 2.0))
    slots = {"a": 0, "b": 1, "c": 5}

    def plan(names: list[str | None], tokens: int = 1) -> tuple[list[int], list[int], int, list[list[int]]]:
        p = stacked.plan_rows(names, slots, tokens, torch.device("cpu"))
        return p.slots, p.rows.tolist(), p.most, [[s, *rows.tolist()] for s, rows, _, _ in p.alone]

    assert plan(["a", "b"], tokens=4) == ([0, 1], [0, 1], 1, [])  # 4 tokens per adapter: the grid
    assert plan(["a", "b"], tokens=5) == ([], [], 0, [[0, 0], [1, 1]])  # 5: each alone
    assert plan(["b", "a", "a", "c"]) == ([0, 1, 5], [1, 2, 0, 3], 2, [])  # 3 x 2 cells for 4 rows
    skewed = plan(["a", "a", "a", "a", "a", "b", "c"])  # a's 5 rows would pad b and c to 15 cells for 7 rows
    assert skewed == ([1, 5], [5, 6], 1, [[0, 0, 1, 2, 3, 4]])
    spans = stacked.plan_rows(["a", "a", "b", "b", "a"], slots, 5, torch.device("cpu")).alone
    assert [span for *_, span in spans] == [None, (2, 2)]  # a's rows are not consecutive, b's are: sliced
    assert plan([None, "d"]) == ([], [], 0, [])  # no row on a slot adapter
    sparse = stacked.plan_rows(["c", "a"], slots, 1, torch.device("cpu"))
    table = torch.arange(6.0)
    assert sparse.select(table).tolist() == [0.0, 5.0]  # slots 0 and 5: gathered, not the range 0..5


def test_slot_reuse_after_eviction_clears_the_padded_rank(tmp_path: Path):
    """A rank-2 adapter placed in the slot a rank-8 adapter left must not see the old factors' tail."""
    paths = save_adapters(tmp_path, {n: lorakit.LoraConfig(r=r, targets=["q_proj"])
                                     for n, r in (("keep", 1), ("big", 8), ("small", 2))}, seed=7)
    model, reference = tiny_llama(), tiny_llama()
    pool = lorakit.AdapterPool(model, capacity=2)
    for name in ("keep", "big", "small"):  # small: validated, not resident (capacity 2)
        pool.register(name, paths[name])
        lorakit.load_adapter(reference, paths[name], name)
    pool.pin("keep")
    stack = model.model.layers[0].self_attn.q_proj.stack
    big_slot = stack.table.slots["big"]
    pool.acquire(["small"])  # evicts big, reuses its slot
    assert stack.rank == 8 and stack.members == {"keep", "small"} and stack.table.slots["small"] == big_slot
    names = ["small", "keep"]
    with torch.no_grad(), lorakit.route(model, names):
        out = model(IDS[:2, :1]).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(out[i : i + 1], row_alone(reference, IDS[i : i + 1, :1], name),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
@pytest.mark.parametrize("limit", [0, 2, float("inf")], ids=["alone", "mixed", "grid"])
@pytest.mark.parametrize("names", [["c", None, "a", "c", "b"], [None, "b", "b", "b", None], [None] * 5,
                                   ["a", "a", "b", "b"], ["c"] * 3, ["a", "a", "a", "a", "c", "b"]])
def test_bgmv_against_a_row_by_row_reference(names, limit, grad, monkeypatch):
    """The product is ``base + x_i A_i^T B_i^T`` with each row's own slot, whatever runs alone or in the grid
    (uneven groups, slots in use that are not contiguous, rows already in slot order, one slot for the whole batch,
    a skewed batch); rows without an adapter keep the base output. Without autograd the sum is formed in the base
    output's storage."""
    monkeypatch.setitem(stacked.GRID_RULES, "cpu", stacked.GridRule(limit if limit != 2 else 4, limit))
    torch.manual_seed(0)
    table = stacked.SlotTable(capacity=5)
    stack = stacked.SlotStack(table, d_in=5, d_out=6, like=torch.zeros((), dtype=torch.float64))
    factors = {}
    for name, r in (("a", 3), ("b", 1), ("unused", 2), ("c", 2)):
        table.assign(name)
        factors[name] = (torch.randn(6, r, dtype=torch.float64), torch.randn(r, 5, dtype=torch.float64))
        stack.put(name, *factors[name])
    x, base = torch.randn(len(names), 2, 5, dtype=torch.float64), torch.randn(len(names), 2, 6, dtype=torch.float64)
    expected = [base[i].clone() if n is None else base[i] + x[i] @ factors[n][1].T @ factors[n][0].T
                for i, n in enumerate(names)]
    with torch.set_grad_enabled(grad):
        out = stack.apply(x, base, RowRouting(names))
    for i in range(len(names)):
        torch.testing.assert_close(out[i], expected[i])
    if any(names):
        assert (out.data_ptr() == base.data_ptr()) == (not grad)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_attached_adapters_train_through_one_grouped_product(monkeypatch, dropout):
    """Attached LoRAs of different ranks routed per row in training (multi-job training): one grouped product per
    layer when every adapter is exactly ``B_eff A_eff`` (no active dropout), else the segment path; both give each
    row its own adapter's output, and each adapter the gradient of its own rows."""
    taken: list[int] = []
    product = stacked.grouped_product
    monkeypatch.setattr(stacked, "grouped_product", lambda *a: taken.append(1) or product(*a))
    model = tiny_llama()
    for name, r in (("a", 2), ("b", 8), ("c", 4)):
        lorakit.adapt(model, lorakit.LoraConfig(r=r, dropout=dropout, targets=["q_proj", "down_proj"]), name)
    with torch.no_grad():
        for p in lorakit.trainable_parameters(model).values():
            p.normal_(0, 0.1)
    model.train()
    names, ids = ["b", "a", "a", None, "c"], IDS[:5, :3]
    torch.manual_seed(0)
    with lorakit.route(model, names):
        model(ids).logits.square().sum().backward()
    assert len(taken) == (4 if dropout == 0 else 0)  # q_proj and down_proj of both layers
    if dropout:
        return
    routed = {k: p.grad.clone() for k, p in lorakit.trainable_parameters(model).items()}
    model.zero_grad(set_to_none=True)
    for i, name in enumerate(names):
        if name is not None:
            lorakit.set_active(model, name)
            model(ids[i : i + 1]).logits.square().sum().backward()
    for key, p in lorakit.trainable_parameters(model).items():
        torch.testing.assert_close(routed[key], p.grad, atol=1e-5, rtol=1e-4)


def test_only_deterministic_factorable_adapters_take_the_grouped_product():
    """``stackable`` reads the adapter's protocol: factorable, no bias, and not stochastic (an active dropout)."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 6))
    lorakit.adapt(model, lorakit.LoraConfig(r=2, targets=["0"], dropout=0.1), "drop")
    lorakit.adapt(model, lorakit.LoraConfig(r=2, targets=["0"]), "plain")
    lorakit.adapt(model, lorakit.DoraConfig(r=2, targets=["0"]), "dora")
    adapters = model[0].adapters
    model.train()
    assert adapters["drop"].stochastic and not stacked.stackable(adapters["drop"], "linear")
    assert stacked.stackable(adapters["plain"], "linear") and not stacked.stackable(adapters["dora"], "linear")
    model.eval()
    assert not adapters["drop"].stochastic and stacked.stackable(adapters["drop"], "linear")


@pytest.mark.parametrize("grad", [False, True])
def test_consecutive_groups_are_sliced_and_equal_the_gathered_product(monkeypatch, grad):
    monkeypatch.setitem(stacked.GRID_RULES, "cpu", stacked.GridRule(0, 2.0))  # every group alone
    g = torch.Generator().manual_seed(0)
    x, base = torch.randn(7, 1, 6, generator=g), torch.randn(7, 1, 5, generator=g)
    a_t, b_t = torch.randn(3, 6, 2, generator=g), torch.randn(3, 2, 5, generator=g)
    names = ["a", "a", "a", "b", "b", "c", "c"]
    plan = stacked.plan_rows(names, {"a": 0, "b": 1, "c": 2}, 1, torch.device("cpu"))
    assert all(span is not None for *_, span in plan.alone)
    slot = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    expected = base + torch.einsum("ntd,ndr,nre->nte", x, a_t[slot], b_t[slot])
    with torch.set_grad_enabled(grad):
        got = stacked.grouped_product(x, base.clone(), a_t, b_t, plan)
    torch.testing.assert_close(got, expected)
