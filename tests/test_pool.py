"""AdapterPool: registration from disk (lorakit and PEFT files), LRU residency, pinning, capacity, hostile input."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from zoo import perturb, tiny_llama

import lorakit
import lorakit.pool as pool_module
from lorakit.io.adapter_files import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE

peft = pytest.importorskip("peft")  # a dev dependency: always installed by `make test`

IDS = torch.randint(0, 96, (4, 5), generator=torch.Generator().manual_seed(0))


def save_adapters(root: Path, specs: dict[str, lorakit.AdapterConfig], seed: int = 0) -> dict[str, Path]:
    """Save one perturbed adapter per ``name -> config`` (each on its own tiny Llama) under ``root/name``."""
    paths = {}
    for i, (name, config) in enumerate(specs.items()):
        torch.manual_seed(seed + i)
        model = lorakit.adapt(tiny_llama(), config, name)
        perturb(model)
        paths[name] = lorakit.save_adapter(model, root / name, name)
    return paths


def row_alone(model: torch.nn.Module, ids: torch.Tensor, name: str | None) -> torch.Tensor:
    """Logits of ``ids`` with only adapter ``name`` active (``None``: the base model)."""
    with torch.no_grad():
        if name is None:
            with lorakit.disable(model):
                return model(ids).logits
        lorakit.set_active(model, name)
        return model(ids).logits


@pytest.fixture
def three(tmp_path: Path) -> dict[str, Path]:
    return save_adapters(tmp_path, {n: lorakit.LoraConfig(r=r, targets=["q_proj", "v_proj"])
                                    for n, r in (("a", 2), ("b", 4), ("c", 8))})


def test_register_reads_files_and_reports_info(three):
    model = tiny_llama()
    pool = lorakit.AdapterPool(model, capacity=2)
    for name, path in three.items():
        pool.register(name, path)
    assert pool.names() == ["a", "b", "c"]
    assert pool.resident() == ["a", "b"]  # validated by attaching once; takes a slot while one is free
    assert pool.in_slots() == {"a", "b"} and not lorakit.configs(model)  # in slots, not attached as modules
    info = pool.info("c")
    file_bytes = sum(t.numel() * t.element_size() for t in load_file(three["c"] / WEIGHTS_FILE).values())
    assert (info["method"], info["rank"], info["bytes"], info["resident"]) == ("lora", 8, file_bytes, False)
    assert info["targets"] == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]


def test_lru_eviction_order(three):
    model = tiny_llama()
    pool = lorakit.AdapterPool(model, capacity=2)
    for name, path in three.items():
        pool.register(name, path)
    pool.acquire(["c"])  # evicts a, the least recently used
    assert pool.resident() == ["b", "c"] and pool.in_slots() == {"b", "c"}
    pool.release(["c"])
    pool.acquire(["b"])  # touch b: c becomes the least recently used
    pool.release(["b"])
    pool.acquire(["a"])
    assert pool.resident() == ["b", "a"]


def test_pinning_and_in_use_prevent_eviction(three):
    pool = lorakit.AdapterPool(tiny_llama(), capacity=2)
    for name, path in three.items():
        pool.register(name, path)
    pool.pin("a")
    pool.acquire(["b"])
    with pytest.raises(lorakit.LorakitError, match="capacity 2 cannot hold .*'c'.*pinned or in use"):
        pool.acquire(["c"])
    assert pool.resident() == ["a", "b"]  # nothing changed
    with pytest.raises(lorakit.LorakitError, match="pinned"):
        pool.unregister("a")
    with pytest.raises(lorakit.LorakitError, match="in use"):
        pool.unregister("b")
    pool.release(["b"])
    pool.acquire(["c"])  # b is free now: evicted, a stays pinned
    assert pool.resident() == ["a", "c"]
    with pytest.raises(lorakit.LorakitError, match="capacity 2 cannot hold"):
        pool.acquire(["b", "c", "a"])  # three at once never fit
    pool.unpin("a")
    pool.release(["c"])
    pool.unregister("a")
    assert pool.names() == ["b", "c"] and pool.resident() == ["c"]


def test_release_and_names_are_checked(three):
    pool = lorakit.AdapterPool(tiny_llama(), capacity=2)
    pool.register("a", three["a"])
    with pytest.raises(lorakit.LorakitError, match="not in use"):
        pool.release(["a"])
    with pytest.raises(lorakit.LorakitError, match="unknown adapter 'zz'; registered: \\['a'\\]"):
        pool.acquire(["zz"])
    with pytest.raises(lorakit.LorakitError, match="already registered"):
        pool.register("a", three["b"])
    with pytest.raises(lorakit.LorakitError, match="must be a Python identifier"):
        pool.register("../a", three["b"])
    with pytest.raises(lorakit.LorakitError, match="capacity=0"):
        lorakit.AdapterPool(tiny_llama(), capacity=0)
    with pytest.raises(lorakit.LorakitError, match="already has an AdapterPool"):
        lorakit.AdapterPool(pool.model, capacity=1)


def test_resident_adapters_route_a_mixed_batch(three):
    model, reference = tiny_llama(), tiny_llama()
    pool = lorakit.AdapterPool(model, capacity=3)
    for name, path in three.items():
        pool.register(name, path)
        lorakit.load_adapter(reference, path, name)
    names = ["c", None, "a", "b"]
    pool.acquire(names[:1] + names[2:])
    with torch.no_grad(), lorakit.route(model, names):
        mixed = model(IDS).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i : i + 1], row_alone(reference, IDS[i : i + 1], name))


def test_swapping_a_factorable_adapter_in_builds_no_module(three, monkeypatch):
    """After registration an adapter's factors live in host memory: acquiring it copies them into slots, without
    attaching modules to the model (S-LoRA's swap is a copy), and its rows still match it run alone."""
    model, reference = tiny_llama(), tiny_llama()
    pool = lorakit.AdapterPool(model, capacity=1)
    for name, path in three.items():
        pool.register(name, path)
        lorakit.load_adapter(reference, path, name)

    def refuse(*args, **kwargs):
        raise AssertionError("a swap must not attach the adapter")

    monkeypatch.setattr(pool_module, "attach_adapter", refuse)
    for name in ("c", "a", "b", "c"):
        pool.acquire([name])
        assert pool.resident() == [name] and not lorakit.configs(model)
        with torch.no_grad(), lorakit.route(model, [name, None]):
            out = model(IDS[:2]).logits
        torch.testing.assert_close(out[:1], row_alone(reference, IDS[:1], name), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1:], row_alone(reference, IDS[1:2], None), atol=1e-5, rtol=1e-5)
        pool.release([name])


def test_routing_to_a_non_resident_or_unknown_adapter_is_refused(three):
    model = tiny_llama()
    pool = lorakit.AdapterPool(model, capacity=1)
    for name, path in three.items():
        pool.register(name, path)
    with pytest.raises(lorakit.LorakitError, match="'b' is registered in the AdapterPool but not resident"):
        with lorakit.route(model, ["a", "b"]):
            pass
    with pytest.raises(lorakit.LorakitError, match="unknown adapter 'zz'; this model has: \\['a'\\]"):
        with lorakit.route(model, ["zz"]):
            pass
    with pytest.raises(lorakit.LorakitError, match="AdapterPool holds adapters"):
        lorakit.unload(model)
    for name in three:
        pool.unregister(name)
    lorakit.unload(model)
    assert not list(lorakit.inject.hosts(model))


def test_register_and_acquire_leave_the_global_rng_alone(three):
    pool = lorakit.AdapterPool(tiny_llama(), capacity=1)
    state = torch.random.get_rng_state()
    pool.register("a", three["a"])
    pool.register("b", three["b"])
    pool.acquire(["b"])
    assert torch.equal(torch.random.get_rng_state(), state)


def test_path_traversal_and_symlinks_are_refused(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    path = save_adapters(outside, {"x": lorakit.LoraConfig(r=2, targets=["q_proj"])})["x"]
    os.symlink(path, allowed / "link")
    pool = lorakit.AdapterPool(tiny_llama(), capacity=1, allowed_dir=allowed)
    for hostile in (allowed / ".." / "outside" / "x", allowed / "link", path):
        with pytest.raises(lorakit.AdapterFileError, match="outside the allowed directory"):
            pool.register("x", hostile)
    assert pool.names() == []


@pytest.mark.parametrize("damage", ["missing", "corrupt", "pickle", "foreign_keys", "wrong_shape"])
def test_bad_files_are_clear_errors_and_leave_the_model_alone(tmp_path, damage):
    path = save_adapters(tmp_path, {"x": lorakit.LoraConfig(r=2, targets=["q_proj"])})["x"]
    (path / MANIFEST_FILE).unlink()  # each damage checked on its own (the manifest would catch all of them first)
    weights = path / WEIGHTS_FILE
    if damage == "missing":
        path = tmp_path / "nowhere"
    elif damage == "corrupt":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + b"\xff" * 40)
    elif damage == "pickle":
        weights.unlink()
        torch.save({}, path / "adapter_model.bin")
    else:
        from safetensors.torch import save_file

        tensors = load_file(weights)
        if damage == "foreign_keys":
            tensors = {k.replace("self_attn", "cross_attn"): v for k, v in tensors.items()}
        else:
            tensors = {k: torch.cat([v, v], dim=0) for k, v in tensors.items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    model = tiny_llama()
    pool = lorakit.AdapterPool(model, capacity=1)
    match = {"missing": "not a directory", "corrupt": "not a valid safetensors", "pickle": "pickle",
             "foreign_keys": "names no module", "wrong_shape": "has shape"}[damage]
    with pytest.raises(lorakit.AdapterFileError, match=match):
        pool.register("x", path)
    assert pool.names() == [] and pool.resident() == [] and not lorakit.configs(model)
    assert not list(lorakit.inject.hosts(model))


def test_peft_files_load_and_match_peft(tmp_path):
    """Adapters written by PEFT itself: the pool's mixed batch equals PEFT's per-adapter outputs."""
    ranks = {"p0": 2, "p1": 4}
    for i, (name, r) in enumerate(ranks.items()):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"],
                              init_lora_weights=False)
        peft.get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path / name)
    assert (tmp_path / "p0" / CONFIG_FILE).is_file()
    model = tiny_llama()
    pool = lorakit.AdapterPool(model, capacity=2, allowed_dir=tmp_path)
    for name in ranks:
        pool.register(name, tmp_path / name)
    assert pool.info("p1")["rank"] == 4 and pool.info("p1")["method"] == "lora"
    names = ["p1", "p0", None, "p1"]
    pool.acquire(["p0", "p1"])
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "p0", adapter_name="p0").eval()
    theirs.load_adapter(tmp_path / "p1", adapter_name="p1")
    for ids in (IDS, IDS[:, :1]):  # prefill-like (segment path) and decode-like (stacked path) shapes
        with torch.no_grad(), lorakit.route(model, names):
            mixed = model(ids).logits
        with torch.no_grad():
            expected = theirs(ids, adapter_names=["p1", "p0", "__base__", "p1"]).logits
        torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_residual_adapter_is_served_as_its_plain_equivalent_without_touching_the_shared_base(tmp_path, init):
    """Issue 14: registering a PiSSA / OLoRA adapter used to rewrite the base every tenant shares."""
    import zoo

    trained = zoo.tiny_llama()
    lorakit.adapt(trained, lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj", "down_proj"], init=init), "res")
    zoo.perturb(trained, 0.3)
    lorakit.save_adapter(trained, tmp_path / "res", name="res")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))

    alone = zoo.tiny_llama()
    lorakit.load_adapter(alone, tmp_path / "res", name="res")  # one tenant: the base rewrite is fine here
    served = zoo.tiny_llama()
    untouched = {k: v.clone() for k, v in served.state_dict().items()}
    pool = lorakit.AdapterPool(served, capacity=2)
    pool.register("res", tmp_path / "res")
    pool.acquire(["res"])
    with torch.no_grad():
        for host in lorakit.inject.hosts(served):  # the shared base weights are bit-identical
            assert torch.equal(host.backend.weight(), untouched[f"{host.path}.weight"]), host.path
        with lorakit.route(served, ["res", None]):
            mixed = served(ids).logits
        torch.testing.assert_close(mixed[0], alone(ids[:1]).logits[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mixed[1], zoo.tiny_llama()(ids[1:]).logits[0], atol=1e-6, rtol=1e-6)


def test_a_lofq_adapter_whose_base_was_replaced_is_refused_by_a_pool(tmp_path):
    import zoo

    trained = zoo.tiny_llama()
    lorakit.adapt(trained, lorakit.LoraConfig(r=2, targets=["q_proj"], init="loftq"), "q")
    lorakit.save_adapter(trained, tmp_path / "q", name="q")
    served = zoo.tiny_llama()
    pool = lorakit.AdapterPool(served, capacity=1)
    with pytest.raises(lorakit.AdapterFileError, match="replaces the base weight"):
        pool.register("q", tmp_path / "q")
    assert pool.names() == [] and not lorakit.configs(served)


def test_max_registered_bounds_what_the_pool_holds_in_host_memory(three):
    pool = lorakit.AdapterPool(tiny_llama(), capacity=1, max_registered=2)
    pool.register("a", three["a"])
    pool.register("b", three["b"])
    with pytest.raises(lorakit.LorakitError, match="maximum of 2 registered adapters"):
        pool.register("c", three["c"])
    assert sorted(pool.names()) == ["a", "b"]
    pool.unregister("a")
    pool.register("c", three["c"])  # room again
    with pytest.raises(lorakit.LorakitError, match="max_registered"):
        lorakit.AdapterPool(tiny_llama(), capacity=1, max_registered=0)
