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
    """Input shapes of the layers that took the stacked path during the test."""
    seen: list[str] = []
    apply = stacked.SlotStack.apply

    def spy(self, x, base_out, routing):
        seen.append(x.shape)
        return apply(self, x, base_out, routing)

    monkeypatch.setattr(stacked.SlotStack, "apply", spy)
    return seen


@pytest.mark.parametrize("limit", [0, float("inf")], ids=["segment", "stacked"])
@pytest.mark.parametrize("tokens", [1, 7], ids=["decode", "prefill"])
def test_mixed_batch_equals_each_row_alone(setup, calls, monkeypatch, limit, tokens):
    model, reference, _ = setup
    monkeypatch.setattr(stacked, "MAX_TOKENS_PER_ADAPTER", limit)
    monkeypatch.setattr(stacked, "MAX_PADDING", limit)
    names = ["bone", "r8", None, "xs", "r2", "r8"]
    ids = IDS[:, :tokens]
    with torch.no_grad(), lorakit.route(model, names):
        mixed = model(ids).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i : i + 1], row_alone(reference, ids[i : i + 1], name),
                                   atol=1e-5, rtol=1e-5)
    assert bool(calls) == bool(limit)  # the forced path was the one taken


def test_layers_with_unpacked_adapters_use_the_segment_path(setup, calls, monkeypatch):
    """DoRA (not factorable) and LoRA with a bias are not packed: their layers fall back; other layers stack."""
    model, reference, _ = setup
    monkeypatch.setattr(stacked, "MAX_TOKENS_PER_ADAPTER", float("inf"))
    monkeypatch.setattr(stacked, "MAX_PADDING", float("inf"))
    names = ["dora", "bias", "r2", "r8"]
    with torch.no_grad(), lorakit.route(model, names):
        mixed = model(IDS[:4]).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i : i + 1], row_alone(reference, IDS[i : i + 1], name),
                                   atol=1e-5, rtol=1e-5)
    fallback = [h.path for h in lorakit.inject.hosts(model) if {"dora", "bias"} & set(h.adapters) - h.stack.members]
    assert fallback == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    n_linear = sum(1 for h in lorakit.inject.hosts(model) if "r2" in h.adapters)
    assert len(calls) == n_linear - len(fallback)


def test_training_and_grad_mode_use_the_segment_path(setup, calls, monkeypatch):
    model, _, _ = setup
    monkeypatch.setattr(stacked, "MAX_TOKENS_PER_ADAPTER", float("inf"))
    monkeypatch.setattr(stacked, "MAX_PADDING", float("inf"))
    with lorakit.route(model, ["r2", "r8"]):
        model(IDS[:2, :1]).logits.sum().backward()  # gradients on: segment path, gradients reach the adapters
    assert not calls
    grads = lorakit.trainable_parameters(model, "r2")
    assert all(p.grad is not None for p in grads.values())
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        with torch.no_grad(), lorakit.route(model, ["r2", "r8"]):
            model(IDS[:2, :1])
    finally:
        model.eval()
    assert not calls


def test_one_adapter_for_every_row_is_the_single_adapter_path(setup, calls):
    """All rows on one adapter: same outputs and gradients as activating it (the fused path, no stacking)."""
    model, _, _ = setup
    with lorakit.route(model, ["r8"] * 3):
        routed = model(IDS[:3]).logits
    routed.sum().backward()
    grads = {k: p.grad.clone() for k, p in lorakit.trainable_parameters(model, "r8").items()}
    model.zero_grad(set_to_none=True)
    lorakit.set_active(model, "r8")
    alone = model(IDS[:3]).logits
    alone.sum().backward()
    torch.testing.assert_close(routed, alone)
    for key, p in lorakit.trainable_parameters(model, "r8").items():
        torch.testing.assert_close(grads[key], p.grad)
    model.zero_grad(set_to_none=True)
    assert not calls


def test_path_choice_follows_group_sizes_and_padding(monkeypatch):
    monkeypatch.setattr(stacked, "MAX_TOKENS_PER_ADAPTER", 4)
    monkeypatch.setattr(stacked, "MAX_PADDING", 2.0)
    table = stacked.SlotTable(capacity=3)
    stack = stacked.SlotStack(table, d_in=3, d_out=2, like=torch.zeros(()))
    for name in ("a", "b", "c"):
        table.assign(name)
        stack.put(name, torch.ones(2, 1), torch.ones(1, 3))
    two = RowRouting(["a", "b"])
    assert stack.takes(torch.zeros(2, 4, 3), two, "ab")  # 4 tokens per adapter
    assert not stack.takes(torch.zeros(2, 5, 3), two, "ab")  # 5
    assert stack.takes(torch.zeros(3, 1, 3), RowRouting(["a", "a", "b"]), "ab")  # grid 2 x 2 = 4 cells, 3 rows
    assert not stack.takes(torch.zeros(4, 1, 3), RowRouting(["a", "a", "a", "c"]), "ac")  # 3 x 3 cells, 4 rows
    assert not stack.takes(torch.zeros(2, 1, 3), RowRouting(["a", "d"]), "ad")  # a routed adapter is not packed


def test_slot_reuse_after_eviction_clears_the_padded_rank(tmp_path: Path):
    """A rank-2 adapter placed in the slot a rank-8 adapter left must not see the old factors' tail."""
    paths = save_adapters(tmp_path, {n: lorakit.LoraConfig(r=r, targets=["q_proj"])
                                     for n, r in (("keep", 1), ("big", 8), ("small", 2))}, seed=7)
    model, reference = tiny_llama(), tiny_llama()
    pool = lorakit.AdapterPool(model, capacity=2)
    for name in ("keep", "big", "small"):  # small: validated, not resident (capacity 2)
        pool.register(name, paths[name])
        lorakit.load_adapter(reference, paths[name], name)
    pool.pin("keep")  # keeps the host layers (and their stacks) alive across the eviction
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


@pytest.mark.parametrize("names", [["c", None, "a", "c", "b"], [None, "b", "b", "b", None], [None] * 5])
def test_bgmv_against_a_row_by_row_reference(names):
    """``apply`` is ``base + x_i A_i^T B_i^T`` with each row's own slot (uneven groups, a slot in the range with no
    rows); rows without an adapter keep the base output."""
    torch.manual_seed(0)
    table = stacked.SlotTable(capacity=5)
    stack = stacked.SlotStack(table, d_in=5, d_out=6, like=torch.zeros((), dtype=torch.float64))
    factors = {}
    for name, r in (("a", 3), ("b", 1), ("unused", 2), ("c", 2)):
        table.assign(name)
        factors[name] = (torch.randn(6, r, dtype=torch.float64), torch.randn(r, 5, dtype=torch.float64))
        stack.put(name, *factors[name])
    x, base = torch.randn(5, 2, 5, dtype=torch.float64), torch.randn(5, 2, 6, dtype=torch.float64)
    out = stack.apply(x, base, RowRouting(names))
    for i, name in enumerate(names):
        expected = base[i] if name is None else base[i] + x[i] @ factors[name][1].T @ factors[name][0].T
        torch.testing.assert_close(out[i], expected)
