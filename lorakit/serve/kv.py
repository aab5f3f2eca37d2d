"""The running batch's key/value cache: sequences join and leave between decode steps.

Newcomers are prefilled together, left-padded (one transformers ``DynamicCache``); joining the batch left-pads either
the batch's cache or the newcomers' to a common length and stacks them on the batch axis, with a 2-D attention mask
whose zeros hide the padding (the same layout as transformers' left-padded batched generation). A sequence leaves by
selecting the other rows; columns that became padding for every row are trimmed. Positions are tracked per row, so
rotary or learned position embeddings see each sequence's own positions, never the padded column index.

The batch's cache layers (:class:`GrowingLayer`) keep spare room on the sequence axis so a decode step writes its
new column in place; transformers' ``DynamicLayer`` concatenates (copies the whole cache) every step, which was half
of a decode step's time at batch 32 on the benchmarks' 8-layer Llama (CPU profile).

Assumes a decoder whose cache layers are all full-attention (Llama, Mistral without sliding window, Qwen2,
GPT-2, ...); a prefill's ``DynamicCache`` is read by iterating it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer


def _pad_left(t: Tensor, n: int) -> Tensor:
    return F.pad(t, (0, 0, n, 0)) if n else t  # (B, H, T, D): pad the T axis on the left


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose buffers grow by doubling; ``keys`` / ``values`` are views of the filled
    part, so appending one token costs one column write instead of a copy of the whole cache."""

    def __init__(self, keys: Tensor, values: Tensor, spare: int = 16) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.length = 0
        self._k = keys.new_empty(*keys.shape[:2], keys.shape[2] + spare, keys.shape[3])
        self._v = values.new_empty(*values.shape[:2], values.shape[2] + spare, values.shape[3])
        self.update(keys, values)

    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object,
               ) -> tuple[Tensor, Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:
            room = max(end, 2 * self._k.shape[-2])
            self._k, self._v = self._grown(self._k, room), self._grown(self._v, room)
        self._k[..., self.length:end, :] = key_states
        self._v[..., self.length:end, :] = value_states
        self.length = end
        self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
        return self.keys, self.values

    def _grown(self, buffer: Tensor, room: int) -> Tensor:
        bigger = buffer.new_empty(*buffer.shape[:2], room, buffer.shape[3])
        bigger[..., :self.length, :] = buffer[..., :self.length, :]
        return bigger


def _cache(tensors: list[tuple[Tensor, Tensor]]) -> Cache:
    return Cache(layers=[GrowingLayer(k, v) for k, v in tensors])


class BatchKV:
    """KV cache, attention mask and next position of every running row."""

    def __init__(self) -> None:
        self.cache: Cache | None = None
        self.mask: Tensor | None = None       # (B, T) 1 = real token, 0 = padding
        self.positions: list[int] = []        # per row: the position of its next token

    def __len__(self) -> int:
        return len(self.positions)

    @staticmethod
    def _tensors(cache: Cache) -> list[tuple[Tensor, Tensor]]:
        return [(layer.keys, layer.values) for layer in cache.layers]

    def join(self, cache: DynamicCache, mask: Tensor, rows: list[int]) -> None:
        """Append rows ``rows`` of a prefilled batch as the last rows: its cache and its left-padded ``(k, L)``
        attention mask (1 = real token)."""
        index = torch.tensor(rows, device=mask.device)
        new = [(k.index_select(0, index), v.index_select(0, index)) for k, v, *_ in cache]
        row_mask = mask.index_select(0, index).long()
        length = row_mask.shape[1]
        if self.cache is None:
            self.cache, self.mask, self.positions = _cache(new), row_mask, row_mask.sum(1).tolist()
            return
        old, width = self._tensors(self.cache), self.mask.shape[1]
        total = max(width, length)
        merged = [(torch.cat([_pad_left(k0, total - width), _pad_left(k1, total - length)]),
                   torch.cat([_pad_left(v0, total - width), _pad_left(v1, total - length)]))
                  for (k0, v0), (k1, v1) in zip(old, new)]
        self.cache = _cache(merged)
        self.mask = torch.cat([F.pad(self.mask, (total - width, 0)), F.pad(row_mask, (total - length, 0))])
        self.positions.extend(row_mask.sum(1).tolist())

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); trims the columns that are padding for every remaining row."""
        if not rows:
            self.cache, self.mask, self.positions = None, None, []
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(0).int().argmax())  # first column some row still uses
        self.mask = mask[:, start:]
        self.cache = _cache([(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                             for k, v in self._tensors(self.cache)])
        self.positions = [self.positions[r] for r in rows]

    def step_inputs(self) -> tuple[Tensor, Tensor]:
        """``(attention_mask, position_ids)`` for one decode step (mask already extended by the new column)."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        positions = torch.tensor(self.positions, device=self.mask.device).unsqueeze(1)
        self.positions = [p + 1 for p in self.positions]
        return self.mask, positions
