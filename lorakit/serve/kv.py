"""The running batch's key/value cache: sequences join and leave between decode steps.

Newcomers are prefilled together, left-padded (one transformers ``DynamicCache``), then copied into the batch's
buffers: every cache layer keeps one preallocated, zero-initialised buffer per key/value, ``(rows, heads, columns,
head_dim)``, with spare rows and columns. The live part is rows ``0..n`` and columns ``start..end``; a 2-D attention
mask (1 = real token) hides each row's padding, the same layout as transformers' left-padded batched generation.
Positions are tracked per row, so rotary or learned position embeddings see each sequence's own positions, never the
column index. Cells outside a row's real tokens hold finite values (zeros or old keys/values), so masked attention
weights of 0 never meet a NaN.

- A decode step writes its new column at ``end`` in place (transformers' ``DynamicLayer`` concatenates: a copy of the
  whole cache every step).
- Joining writes only the newcomers' rows, right-aligned at ``end``; a prompt longer than the live columns moves
  ``start`` to the left, into free columns when there are, else the buffers are rebuilt with room (doubling).
- Leaving gathers the rows after the first one that left up into place, and advances ``start`` past the columns that
  became padding for every remaining row.

Rebuilding the whole cache on every join and leave, as lorakit did before, took about a third of the engine's time at
batch 32 on the benchmarks' 8-layer Llama (CPU profile). Assumes a decoder whose cache layers are all full-attention
(Llama, Mistral without sliding window, Qwen2, GPT-2, ...); a prefill's ``DynamicCache`` is read by iterating it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_COLUMNS = 16  # minimum free columns after a rebuild


class BufferLayer(DynamicLayer):
    """One cache layer over preallocated ``(rows, heads, columns, head_dim)`` buffers; ``keys`` / ``values`` are views
    of the live part (rows ``0..n``, columns ``start..end`` of the owning :class:`BatchKV`)."""

    def __init__(self, owner: BatchKV, k_buf: Tensor, v_buf: Tensor) -> None:
        super().__init__()
        self.lazy_initialization(k_buf, v_buf)
        self.owner, self.k_buf, self.v_buf = owner, k_buf, v_buf
        self.view()

    def view(self) -> None:
        o = self.owner
        self.keys = self.k_buf[: o.n, :, o.start : o.end]
        self.values = self.v_buf[: o.n, :, o.start : o.end]

    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object,
               ) -> tuple[Tensor, Tensor]:
        """Write one decode step's column at ``end`` (room was made by :meth:`BatchKV.step_inputs`)."""
        o, end = self.owner, self.owner.end
        self.k_buf[: o.n, :, end : end + 1] = key_states
        self.v_buf[: o.n, :, end : end + 1] = value_states
        self.keys = self.k_buf[: o.n, :, o.start : end + 1]
        self.values = self.v_buf[: o.n, :, o.start : end + 1]
        return self.keys, self.values


class BatchKV:
    """KV cache, attention mask and next position of every running row."""

    def __init__(self) -> None:
        self.cache: Cache | None = None
        self.mask: Tensor | None = None       # (n, end - start): 1 = real token, 0 = padding
        self.positions: list[int] = []        # per row: the position of its next token
        self.n = self.start = self.end = 0

    def __len__(self) -> int:
        return self.n

    @property
    def layers(self) -> list[BufferLayer]:
        return [] if self.cache is None else self.cache.layers  # type: ignore[return-value]

    def join(self, cache: DynamicCache, mask: Tensor, rows: list[int]) -> None:
        """Append rows ``rows`` of a prefilled batch as the last rows: its cache and its left-padded ``(k, L)``
        attention mask (1 = real token)."""
        index = torch.tensor(rows, device=mask.device)
        new = [(k.index_select(0, index), v.index_select(0, index)) for k, v, *_ in cache]
        row_mask = mask.index_select(0, index).long()
        k, length = row_mask.shape
        if self.cache is None:  # an empty live part at column `length`: the newcomers fill the columns before it
            self.start = self.end = length
            self.cache = Cache(layers=[BufferLayer(self, *_buffers(keys, k, length)) for keys, _ in new])
            self.mask = row_mask.new_zeros(0, 0)
        width = self.end - self.start
        grow = max(length - width, 0)  # columns the live part gains on the left
        if self.n + k > self.layers[0].k_buf.shape[0] or grow > self.start:
            self._rebuild(self.n + k, left=grow)
        self.start -= grow
        for layer, (keys, values) in zip(self.layers, new):
            layer.k_buf[self.n : self.n + k, :, self.end - length : self.end] = keys
            layer.v_buf[self.n : self.n + k, :, self.end - length : self.end] = values
        self.mask = torch.cat([F.pad(self.mask, (grow, 0)), F.pad(row_mask, (width + grow - length, 0))])
        self.positions.extend(row_mask.sum(1).tolist())
        self.n += k
        self._views()

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (ascending); trims the columns that are padding for every remaining row."""
        if not rows:
            self.__init__()
            return
        first = next((i for i, r in enumerate(rows) if r != i), len(rows))  # rows before it stay in place
        if first < len(rows):
            moved = torch.tensor(rows[first:], device=self.mask.device)
            for layer in self.layers:
                for buf in (layer.k_buf, layer.v_buf):
                    live = buf[:, :, self.start : self.end]
                    live[first : len(rows)] = live.index_select(0, moved)
        mask = self.mask[rows]
        trim = int(mask.any(0).int().argmax())  # first column some row still uses
        self.mask, self.start = mask[:, trim:], self.start + trim
        self.positions = [self.positions[r] for r in rows]
        self.n = len(rows)
        self._views()

    def reserve_rows(self, rows: int) -> None:
        """Make the buffers hold at least ``rows`` rows (a static decode step writes its padding rows too)."""
        if self.layers and rows > self.layers[0].k_buf.shape[0]:
            self._rebuild(rows, left=self.start)
            self._views()

    def step_inputs(self) -> tuple[Tensor, Tensor]:
        """``(attention_mask, position_ids)`` for one decode step, whose column the layers write at ``end``; call
        :meth:`step_done` after the forward pass."""
        if self.end == self.layers[0].k_buf.shape[2]:
            self._rebuild(self.n, left=0)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        positions = torch.tensor(self.positions, device=self.mask.device).unsqueeze(1)
        self.positions = [p + 1 for p in self.positions]
        return self.mask, positions

    def step_done(self) -> None:
        """The decode step's column is written: the live part ends one column later."""
        self.end += 1
        self._views()

    def _views(self) -> None:
        for layer in self.layers:
            layer.view()

    def _rebuild(self, rows: int, left: int) -> None:
        """New buffers with room for ``rows`` rows (doubling when they grow), the live part copied after ``left``
        free columns and followed by as many free ones (at least :data:`SPARE_COLUMNS`)."""
        width = self.end - self.start
        for layer in self.layers:
            capacity = layer.k_buf.shape[0]
            k_buf, v_buf = _buffers(layer.k_buf, capacity if rows <= capacity else max(rows, 2 * capacity),
                                    left + width)
            k_buf[: self.n, :, left : left + width] = layer.k_buf[: self.n, :, self.start : self.end]
            v_buf[: self.n, :, left : left + width] = layer.v_buf[: self.n, :, self.start : self.end]
            layer.k_buf, layer.v_buf = k_buf, v_buf
        self.start, self.end = left, left + width


def _buffers(like: Tensor, rows: int, columns: int) -> tuple[Tensor, Tensor]:
    """Zeroed key and value buffers shaped like ``like`` ``(*, heads, *, head_dim)``: ``rows`` rows, ``columns``
    columns plus as many spare (at least :data:`SPARE_COLUMNS`)."""
    shape = (rows, like.shape[1], columns + max(SPARE_COLUMNS, columns), like.shape[3])
    return like.new_zeros(shape), like.new_zeros(shape)
