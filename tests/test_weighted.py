"""Weighted routing on real models: top-k routers dispatch each token only to its adapters, routers train and save
like adapters, bad weights and files are refused with clear errors."""
from __future__ import annotations

import pytest
import torch
from zoo import tiny_llama

import lorakit
from lorakit.errors import AdapterFileError, LorakitError
from lorakit.io.routers import load_router, save_router
from lorakit.routing.routers import GateRouter

NAMES = ["a", "b", "c"]
IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))


def experts(seed: int = 0) -> torch.nn.Module:
    model = tiny_llama(seed)
    for i, name in enumerate(NAMES):
        lorakit.adapt(model, lorakit.LoraConfig(r=2, targets=["q_proj", "v_proj", "down_proj"], init="gaussian"),
                      name)
        with torch.no_grad():
            for p in lorakit.trainable_parameters(model, name).values():
                p.normal_(0, 0.2 * (i + 1))
    return model


def gated(model: torch.nn.Module, top_k: int | None) -> GateRouter:
    router = lorakit.add_router(model, "moe", lorakit.gate_router(model, NAMES, top_k=top_k))
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 1.0)
    return router


def test_top_k_router_sends_each_token_only_to_its_adapters():
    model = experts()
    router = gated(model, top_k=1)
    seen: dict[str, int] = {}
    host = model.model.layers[0].self_attn.q_proj
    for name in NAMES:
        host.adapters[name].register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, seen.get(name, 0) + args[0].shape[0]))
    with torch.no_grad(), lorakit.mix(model, NAMES, router):
        sparse = model(IDS).logits
    assert sum(seen.values()) == IDS.numel() and len(seen) > 1  # every token reached exactly one adapter
    with torch.no_grad(), lorakit.mix(model, NAMES, router, dispatch="dense"):
        dense = model(IDS).logits
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)


def test_router_trains_and_is_saved_like_an_adapter(tmp_path):
    model = experts()
    router = gated(model, top_k=2)
    params = lorakit.trainable_parameters(model)
    assert any(k.startswith("lorakit_routers.moe.") for k in params)
    assert set(lorakit.trainable_parameters(model, "moe")) == {f"lorakit_routers.moe.{k}"
                                                                for k, _ in router.named_parameters()}
    with lorakit.mix(model, NAMES, router):
        model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())
    with torch.no_grad(), lorakit.mix(model, NAMES, router):
        before = model(IDS).logits
    save_router(model, tmp_path / "moe", "moe")
    fresh = experts()
    loaded = load_router(fresh, tmp_path / "moe", "moe")
    assert isinstance(loaded, GateRouter) and loaded.top_k == 2
    with torch.no_grad(), lorakit.mix(fresh, NAMES, loaded):
        torch.testing.assert_close(fresh(IDS).logits, before, atol=0, rtol=0)


def test_fixed_weights_per_row_equal_a_linear_combination_of_each_adapter():
    model = experts()
    weights = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    with torch.no_grad(), lorakit.mix(model, NAMES, weights):
        mixed = model(IDS).logits
    lorakit.set_active(model, "b")
    with torch.no_grad():
        torch.testing.assert_close(mixed[1], model(IDS[1:]).logits[0], atol=1e-5, rtol=1e-5)


def test_bad_weights_and_routers_are_refused():
    model = experts()
    with pytest.raises(LorakitError, match=r"weights=\(4,\) is invalid.*n = 3"):
        with lorakit.mix(model, NAMES, torch.ones(4)):
            pass
    with pytest.raises(LorakitError, match=r"do not fit its input of shape \(2, 7, 32\)"):
        with torch.no_grad(), lorakit.mix(model, NAMES, torch.ones(3, 3)):
            model(IDS)
    with pytest.raises(LorakitError, match="unknown adapter 'z'"):
        with lorakit.mix(model, ["a", "z"], torch.ones(2)):
            pass
    with pytest.raises(LorakitError, match="top_k=4 is invalid"):
        lorakit.gate_router(model, NAMES, top_k=4)
    lorakit.merge(model, "a")
    with pytest.raises(LorakitError, match="merged adapters"):
        with torch.no_grad(), lorakit.mix(model, NAMES, torch.ones(3)):
            model(IDS)


def test_corrupt_router_files_are_refused(tmp_path):
    model = experts()
    gated(model, top_k=None)
    save_router(model, tmp_path, "moe")
    (tmp_path / "router_config.json").write_text('{"kind": "nope", "config": {}}')
    with pytest.raises(AdapterFileError, match="'kind' among"):
        load_router(experts(), tmp_path, "moe")
    (tmp_path / "router_config.json").write_text('{"kind": "gate", "config": {"n": 3, "layers": {"x": 5}}}')
    with pytest.raises(AdapterFileError, match="do not match the router"):
        load_router(experts(), tmp_path, "moe")


def test_adapters_held_only_in_a_pools_slots_are_refused_not_skipped(tmp_path):
    model = experts()
    lorakit.save_adapter(model, tmp_path / "a", name="a")
    served = tiny_llama(0)
    pool = lorakit.AdapterPool(served, capacity=2)
    pool.register("a", tmp_path / "a")
    pool.acquire(["a"])
    with pytest.raises(LorakitError, match="unknown adapter 'a'"):
        with lorakit.mix(served, ["a"], torch.ones(1)):
            pass


def test_deleting_the_last_router_removes_its_parameters_and_container():
    model = experts()
    gated(model, top_k=None)
    lorakit.delete_router(model, "moe")
    assert not any(k.startswith("lorakit_routers") for k in lorakit.trainable_parameters(model))
    assert "lorakit_routers" not in dict(model.named_children())
    with pytest.raises(LorakitError, match="unknown router 'moe'"):
        lorakit.delete_router(model, "moe")


def test_dense_weights_take_the_concatenated_product_equal_to_the_reference():
    model = experts()
    weights = torch.softmax(torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(2)), -1)
    calls = []
    for name in NAMES:
        model.model.layers[0].self_attn.q_proj.adapters[name].register_forward_hook(lambda *a: calls.append(1))
    params = lorakit.trainable_parameters(model)
    grads = {}
    for dispatch in ("sparse", "dense"):
        for p in params.values():
            p.grad = None
        with lorakit.mix(model, NAMES, weights, dispatch=dispatch):
            out = model(IDS).logits
        out.square().mean().backward()
        grads[dispatch] = (out.detach(), {k: p.grad.clone() for k, p in params.items()})
    assert len(calls) == 3  # only the dense reference called the adapters one by one
    torch.testing.assert_close(grads["sparse"][0], grads["dense"][0], atol=1e-5, rtol=1e-5)
    for key, grad in grads["dense"][1].items():
        torch.testing.assert_close(grads["sparse"][1][key], grad, atol=1e-5, rtol=1e-4)
