"""Grouped multi-adapter LoRA kernels (SGMV / BGMV in Triton) against a token-by-token reference, their layout, and
the stacked path with the kernels forced on against the PyTorch product on a tiny Llama.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from zoo import perturb, tiny_llama

import lorakit
from lorakit.routing import stacked

pytest.importorskip("triton")  # optional; `make test` installs it
grouped = pytest.importorskip("lorakit.kernels.grouped")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
D_IN, D_OUT = 37, 45  # not multiples of the block sizes
RANKS = {"r3": 3, "r8": 8, "r16": 16}  # storage padded to 16


@contextmanager
def backend(name: stacked.Backend) -> Iterator[None]:
    previous = stacked.set_kernel_backend(name)
    try:
        yield
    finally:
        stacked.set_kernel_backend(previous)


def make_stack(dtype: torch.dtype) -> stacked.SlotStack:
    """Slots 0..2: ranks 3, 8, 16; slot 3: an adapter put then dropped (rank 0); slot 4: never used. Everything past
    each slot's rank is filled with large garbage, which the kernels must never read."""
    table = stacked.SlotTable(capacity=5)
    stack = stacked.SlotStack(table, D_IN, D_OUT, like=torch.zeros((), dtype=dtype, device=DEVICE))
    for name, r in [*RANKS.items(), ("gone", 4)]:
        table.assign(name)
        a = torch.randn(r, D_IN, device=DEVICE) / D_IN**0.5
        stack.put(name, torch.randn(D_OUT, r, device=DEVICE) / r**0.5, a)
    stack.drop("gone")
    assert stack.ranks.tolist() == [3, 8, 16, 0, 0] and stack.ranks.dtype == torch.int32
    with torch.no_grad():
        for slot, r in enumerate(stack.ranks.tolist()):
            stack.a_t[slot, :, r:] = torch.randn_like(stack.a_t[slot, :, r:]) * 1e3 + 1e3
            stack.b_t[slot, r:] = torch.randn_like(stack.b_t[slot, r:]) * 1e3 + 1e3
    return stack


def reference(x: torch.Tensor, out: torch.Tensor, stack: stacked.SlotStack, token_slots: torch.Tensor) -> torch.Tensor:
    """``out_i + (x_i A^T[s][:, :r]) B^T[s][:r]`` token by token, in float32 (``h`` rounded to the factors' dtype, as
    the kernels store it)."""
    expected = out.float().clone()
    for i, s in enumerate(token_slots.tolist()):
        if s >= 0:
            r = int(stack.ranks[s])
            h = x[i].to(stack.a_t.dtype).float() @ stack.a_t[s, :, :r].float()
            expected[i] += h.to(stack.a_t.dtype).float() @ stack.b_t[s, :r].float()
    return expected


def test_layout_sorts_tokens_by_slot_and_cuts_segments_into_blocks():
    block = grouped.BLOCK_M
    token_slots = torch.tensor([2, -1, 0, 2, 5, 0, -1] + [1] * (2 * block + 3) + [2])
    layout = grouped.make_layout(token_slots, DEVICE)
    kept = [i for i, s in enumerate(token_slots.tolist()) if s >= 0]
    order = sorted(kept, key=lambda i: int(token_slots[i]))  # stable: batch order within a slot
    assert (layout.tokens, layout.slots) == (len(token_slots), 6)
    assert layout.order.tolist() == order and layout.order.dtype == torch.int32 and layout.order.device == DEVICE
    assert layout.token_slot.tolist() == [int(token_slots[i]) for i in order]
    ones = 2 * block + 3  # slot 1's segment: two full blocks and a short one
    assert layout.blocks.tolist() == [[0, 0, 2], [1, 2, block], [1, 2 + block, block], [1, 2 + 2 * block, 3],
                                      [2, 2 + ones, 3], [5, 2 + ones + 3, 1]]
    assert layout.decode  # 41 tokens in 4 segments: fewer than BLOCK_M per segment on average
    assert not grouped.make_layout(torch.tensor([1] * block + [0] * block), DEVICE).decode
    assert not grouped.make_layout(token_slots, DEVICE, decode=False).decode
    empty = grouped.make_layout(torch.tensor([-1, -1]), DEVICE)
    assert empty.order.numel() == empty.blocks.numel() == empty.slots == 0 and not empty.decode
    with pytest.raises(lorakit.LorakitError, match="token_slots holds -2"):
        grouped.make_layout(torch.tensor([0, -2]))
    with pytest.raises(lorakit.LorakitError, match="1-d integer tensor"):
        grouped.make_layout(torch.zeros(2, 3, dtype=torch.long))


DTYPES = {  # x / out dtype, factor dtype
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16-x-fp32-factors": (torch.float16, torch.float32),
}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtypes", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("kernel", ["auto", "other"])
@pytest.mark.parametrize("case", ["prefill", "decode"])
def test_kernels_match_a_token_by_token_reference(dtypes, kernel, case):
    """Unsorted rows, rows without an adapter and on an empty slot, ranks 3 / 8 / 16 over garbage padding: ``auto``
    picks SGMV for prefill (20 tokens per row) and BGMV for decode (1); ``other`` forces the other kernel."""
    x_dtype, factor_dtype = DTYPES[dtypes]
    decode = case == "decode"
    if INTERPRETED and x_dtype == torch.bfloat16 and decode == (kernel == "other"):
        pytest.skip("Triton's interpreter multiplies bfloat16's raw bits in tl.dot (SGMV); runs on a GPU")
    stack = make_stack(factor_dtype)
    row_slots = torch.tensor([2, -1, 0, 2, 1, 3] + ([4, 0, 2, -1, 1] if decode else []))
    token_slots = row_slots.repeat_interleave(1 if decode else 20)
    forced = None if kernel == "auto" else not decode
    layout = grouped.make_layout(token_slots, DEVICE, decode=forced)
    assert layout.decode == (decode if forced is None else forced)
    n = len(token_slots)
    x = torch.randn(D_IN, n, device=DEVICE).to(x_dtype).t()  # a strided view
    out = torch.randn(n, D_OUT, device=DEVICE).to(x_dtype)
    expected = reference(x, out, stack, token_slots)
    grouped.grouped_lora(x, out, stack.a_t, stack.b_t, stack.ranks, layout)
    tol = TOLERANCE[x_dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_grouped_lora_names_what_does_not_fit():
    stack = make_stack(torch.float32)
    layout = grouped.make_layout(torch.tensor([0, 1]), DEVICE)
    x, out = torch.zeros(2, D_IN, device=DEVICE), torch.zeros(2, D_OUT, device=DEVICE)
    a_t, b_t, ranks = stack.a_t, stack.b_t, stack.ranks
    with pytest.raises(lorakit.LorakitError, match="a_t's d_in"):
        grouped.grouped_lora(x[:, 1:], out, a_t, b_t, ranks, layout)
    with pytest.raises(lorakit.LorakitError, match="layout \\(2 tokens\\)"):
        grouped.grouped_lora(x[:1], out[:1], a_t, b_t, ranks, layout)
    with pytest.raises(lorakit.LorakitError, match="ranks must be int32"):
        grouped.grouped_lora(x, out, a_t, b_t, ranks.long(), layout)
    with pytest.raises(lorakit.LorakitError, match="one entry per slot"):
        grouped.grouped_lora(x, out, a_t, b_t, ranks[:4], layout)
    with pytest.raises(lorakit.LorakitError, match="uses slot 5, past the last slot"):
        grouped.grouped_lora(x, out, a_t, b_t, ranks, grouped.make_layout(torch.tensor([0, 5]), DEVICE))
    with pytest.raises(lorakit.LorakitError, match="float64.*not supported"):
        grouped.grouped_lora(x.double(), out.double(), a_t, b_t, ranks, layout)
    with pytest.raises(lorakit.LorakitError, match="'auto', 'torch' or 'triton'"):
        stacked.set_kernel_backend("cuda")  # type: ignore[arg-type]


ADAPTERS = {"a": (3, "all-linear"), "b": (8, ["q_proj", "v_proj", "down_proj"]), "c": (16, "all-linear")}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """A tiny Llama serving LoRAs of ranks 3, 8 and 16 (one on fewer layers: empty slots there) from a pool."""
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_llama().to(DEVICE)
    pool = lorakit.AdapterPool(model, capacity=len(ADAPTERS))
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(i)
        trained = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(r=r, targets=targets), name)
        perturb(trained)
        pool.register(name, lorakit.save_adapter(trained, Path(root) / name, name))
    assert pool.in_slots() == set(ADAPTERS)
    return model


@pytest.mark.parametrize("tokens", [1, 20], ids=["decode", "prefill"])
def test_tiny_llama_logits_match_the_torch_backend(served, monkeypatch, tokens):
    ids = torch.randint(0, 96, (5, tokens), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    names = ["b", None, "a", "c", "b"]
    launched: list[bool] = []
    kernel = grouped.grouped_lora
    monkeypatch.setattr(grouped, "grouped_lora", lambda *args: launched.append(args[-1].decode) or kernel(*args))
    with torch.no_grad():
        with backend("torch"), lorakit.route(served, names):
            expected = served(ids).logits
        assert not launched
        with backend("triton"), lorakit.route(served, names):
            got = served(ids).logits
    assert launched == [tokens == 1] * 14  # 7 linear layers in each of 2 blocks, every one holding a slot adapter
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with backend("triton"), lorakit.route(served, names):  # with autograd: the PyTorch product
        torch.testing.assert_close(served(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert len(launched) == 14
