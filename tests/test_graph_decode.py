"""Static-shape decode steps (lorakit.serve.graphs): padded rows, full-width KV buffers read through a 4-D mask, and
pool slots in a tensor give the same tokens as the engine's dynamic step. On a CPU the static step runs eagerly with
the Triton kernels under the interpreter; on a GPU it is captured in CUDA graphs and replayed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import zoo
from test_engine import reference, run, tiny_tokenizer, tokens

import lorakit
from lorakit.pool import AdapterPool
from lorakit.routing.stacked import set_kernel_backend
from lorakit.serve.engine import Engine
from lorakit.serve.graphs import StaticDecode, bucket
from lorakit.serve.kv import BatchKV
from lorakit.serve.sampling import SamplingParams

pytest.importorskip("triton")


def pool_of_three(tmp_path: Path, device: str = "cpu") -> tuple[torch.nn.Module, AdapterPool]:
    """Adapters a, b, c of ranks 2, 4, 8 on all linear layers, far from zero, registered in a pool from files."""
    source = zoo.tiny_llama()
    for name, r in zip("abc", (2, 4, 8)):
        lorakit.adapt(source, lorakit.LoraConfig(r=r, targets="all-linear"), name, activate=False)
    zoo.perturb(source, 0.5)
    pool = AdapterPool(zoo.tiny_llama().to(device), capacity=3)
    for name in "abc":
        pool.register(name, lorakit.save_adapter(source, tmp_path / name, name))
    return source, pool


JOBS = [("hello", "a"), ("two words", "b"), ("x", None), ("a longer prompt here", "c"), ("five", "a"),
        ("six!", "b"), ("seven", None)]


def jobs(tok) -> list:
    return [(tok(p).input_ids, a, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)) for p, a in JOBS]


@pytest.fixture
def triton_kernels():
    previous = set_kernel_backend("triton")
    yield
    set_kernel_backend(previous)


def test_rows_pad_to_powers_of_two() -> None:
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 33)] == [1, 2, 4, 4, 8, 8, 16, 64]


def test_static_steps_give_the_dynamic_steps_tokens(tmp_path: Path, triton_kernels: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    source, pool = pool_of_three(tmp_path)
    tok = tiny_tokenizer()
    calls: list[int] = []
    step = StaticDecode.step
    monkeypatch.setattr(StaticDecode, "step", lambda self, kv, t, *a: calls.append(len(t)) or step(self, kv, t, *a))
    static = run(Engine(pool.model, tok, pool, max_batch=5, graphs=True), jobs(tok))
    assert calls and max(calls) == 5 and 3 in calls  # 5 rows pad to 8, 3 to 4: padding rows are exercised
    dynamic = run(Engine(pool.model, tok, pool, max_batch=5, graphs=False), jobs(tok))
    assert [tokens(o) for o in static] == [tokens(o) for o in dynamic]
    for out, (prompt, adapter, params) in zip(static, jobs(tok)):
        assert tokens(out) == reference(source, prompt, adapter, params.max_tokens, True), adapter


def test_rows_of_adapters_outside_the_slots_take_the_dynamic_step(tmp_path: Path, triton_kernels: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    source, pool = pool_of_three(tmp_path)
    engine = Engine(pool.model, tiny_tokenizer(), pool, graphs=True)
    assert engine._static_slots(["a", None, "c"]) == [pool.slot_table.slots["a"], -1, pool.slot_table.slots["c"]]
    assert engine._static_slots(["a", "not-in-a-slot"]) is None
    set_kernel_backend("torch")  # no kernels: the static step cannot run
    assert engine._static_slots(["a"]) is None
    assert Engine(source, tiny_tokenizer(), graphs=True)._static is None  # attached adapters: no pool, no slots


def test_reserving_rows_keeps_the_live_cache() -> None:
    kv = BatchKV()
    k = torch.randn(2, 1, 3, 4)
    cache = [(k, k + 1)]
    kv.join(cache, torch.ones(2, 3, dtype=torch.long), [0, 1])
    kv.reserve_rows(8)
    assert kv.layers[0].k_buf.shape[0] >= 8
    torch.testing.assert_close(kv.layers[0].keys, k)
    torch.testing.assert_close(kv.layers[0].values, k + 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_graphs_replay_the_dynamic_tokens(tmp_path: Path) -> None:
    _, pool = pool_of_three(tmp_path, "cuda")
    tok = tiny_tokenizer()
    engine = Engine(pool.model, tok, pool, max_batch=5)  # graphs by default on a GPU
    captured = run(engine, jobs(tok))
    assert engine._static is not None and engine._static.replays > 0
    dynamic = run(Engine(pool.model, tok, pool, max_batch=5, graphs=False), jobs(tok))
    assert [tokens(o) for o in captured] == [tokens(o) for o in dynamic]
