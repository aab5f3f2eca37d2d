"""The serving engine's batch KV cache (lorakit.serve.kv): after any sequence of joins, decode steps and leaves,
each row's live keys/values under its mask are exactly its own tokens, in order."""
from __future__ import annotations

import random

import pytest
import torch

from lorakit.serve import kv as kv_module
from lorakit.serve.kv import BatchKV

LAYERS, HEADS, DIM = 2, 2, 3


def states(rows: int, columns: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random ``(keys, values)`` per layer, each ``(rows, HEADS, columns, DIM)`` (a cache's layout)."""
    return [(torch.randn(rows, HEADS, columns, DIM, generator=gen), torch.randn(rows, HEADS, columns, DIM,
                                                                               generator=gen)) for _ in range(LAYERS)]


def check(kv: BatchKV, rows: list[list[torch.Tensor]]) -> None:
    """``rows[i][layer]``: row ``i``'s real (key, value) columns, ``(2, HEADS, t, DIM)``."""
    assert len(kv) == len(rows) and kv.positions == [r[0].shape[2] for r in rows]
    for layer_index, layer in enumerate(kv.layers):
        assert layer.keys.shape[:3] == (len(rows), HEADS, kv.mask.shape[1])
        for i, row in enumerate(rows):
            real = kv.mask[i].bool()
            torch.testing.assert_close(layer.keys[i][:, real], row[layer_index][0], rtol=0, atol=0)
            torch.testing.assert_close(layer.values[i][:, real], row[layer_index][1], rtol=0, atol=0)
            assert not real[: int((~real).sum())].any()  # padding on the left only


@pytest.mark.parametrize("seed", range(4))
def test_joins_steps_and_leaves_keep_every_rows_tokens(seed, monkeypatch):
    monkeypatch.setattr(kv_module, "SPARE_COLUMNS", 1)  # rebuild often
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    kv, rows = BatchKV(), []
    for _ in range(40):
        op = rng.choice(["join", "step", "step", "leave"] if rows else ["join"])
        if op == "join":
            lengths = [rng.randint(1, 9) for _ in range(rng.randint(1, 3))]
            width = max(lengths)
            batch = states(len(lengths), width, gen)  # a left-padded prefill's cache
            mask = torch.zeros(len(lengths), width, dtype=torch.long)
            for r, n in enumerate(lengths):
                mask[r, width - n:] = 1
            going = sorted(rng.sample(range(len(lengths)), rng.randint(1, len(lengths))))
            kv.join(batch, mask, going)
            rows += [[torch.stack([k[r, :, width - lengths[r]:], v[r, :, width - lengths[r]:]]) for k, v in batch]
                     for r in going]
        elif op == "step":
            mask, positions = kv.step_inputs()
            assert mask.shape == (len(rows), kv.end - kv.start + 1)
            assert positions[:, 0].tolist() == [r[0].shape[2] for r in rows]
            for layer_index, (layer, (k_new, v_new)) in enumerate(zip(kv.layers, states(len(rows), 1, gen))):
                keys, _ = layer.update(k_new, v_new)
                assert keys.shape[2] == mask.shape[1]
                for i, row in enumerate(rows):
                    row[layer_index] = torch.cat([row[layer_index], torch.stack([k_new[i], v_new[i]])], dim=2)
            kv.step_done()
        else:
            keep = sorted(rng.sample(range(len(rows)), rng.randint(0, len(rows))))
            kv.keep(keep)
            rows = [rows[i] for i in keep]
        if rows:
            check(kv, rows)
        else:
            assert len(kv) == 0
