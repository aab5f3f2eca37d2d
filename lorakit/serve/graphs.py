"""Graph-captured decode steps: the running batch's decode step with static shapes, replayed from CUDA graphs.

A decode step launches about a thousand kernels from Python for a few milliseconds of GPU work (issue 16 measured
17 ms of wall time for 5.6 ms of GPU time on an H200): it is launch-bound. A CUDA graph replays all of them with one
launch, but only if every tensor the step reads keeps its address and shape. :class:`StaticDecode` gives the step
static shapes:

- rows padded to a bucket (1, 2, 4, ... up to the engine's ``max_batch``); padding rows use no adapter and attend to
  their own new column only, and their outputs are dropped;
- the KV buffers of :class:`~lorakit.serve.kv.BatchKV` read at their full column capacity: the step's column is
  written at a position held in a tensor, and attention reads every column through a 4-D additive mask (0: attend,
  the dtype's minimum: not) built from the batch's mask;
- each row's adapter as an adapter-pool slot id in a tensor (-1: the base model), read by the BGMV kernel
  (:mod:`lorakit.kernels.grouped`) in every adapted layer, instead of the per-batch plan of the dynamic path.

It applies when every row's adapter sits in the pool's slots (the stacked path) and the kernels can run (triton
installed; see :func:`lorakit.routing.stacked.set_kernel_backend`); otherwise (adapters attached as modules, served
mixtures) the engine runs its dynamic step. On CUDA one graph is captured per bucket and recaptured when the KV
buffers or the slot tensors are reallocated (the KV cache doubling, a higher-rank adapter entering the pool); a
failed capture turns graphs off and the static step runs eagerly. Elsewhere (a CPU: the tests) the same static step
runs eagerly, so its equality with the dynamic step is checked without a GPU.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from ..inject import using
from ..routing.stacked import SlotTable, grouped_kernels
from ..routing.strategy import Host, Routing
from .kv import BatchKV

log = logging.getLogger(__name__)


def bucket(rows: int) -> int:
    """The padded row count for ``rows`` running requests: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


class _ColumnLayer(DynamicLayer):
    """A cache layer over one :class:`BatchKV` layer's buffers: writes the step's key/value column at the position in
    ``column`` (a one-element tensor) for all ``rows`` rows and returns the buffers' full width."""

    def __init__(self, k_buf: Tensor, v_buf: Tensor, rows: int, column: Tensor) -> None:
        super().__init__()
        self.lazy_initialization(k_buf, v_buf)
        self.keys, self.values, self.column = k_buf[:rows], v_buf[:rows], column

    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object,
               ) -> tuple[Tensor, Tensor]:
        self.keys.index_copy_(2, self.column, key_states)
        self.values.index_copy_(2, self.column, value_states)
        return self.keys, self.values


class SlotRouting(Routing):
    """Each row's adapter by its pool slot in ``layout.token_slot`` (-1: none), one BGMV pair per adapted layer; no
    per-batch Python work, so a CUDA graph can capture it."""

    def __init__(self, layout: Any) -> None:
        self.layout = layout

    def forward(self, host: Host, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = host.base_layer(x, *args, **kwargs)
        if host.stack is not None:
            stack = host.stack
            grouped_kernels().grouped_lora(x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1]), stack.a_t,
                                           stack.b_t, stack.ranks, self.layout)
        return out


@dataclass
class _Inputs:
    """One bucket's static input tensors (their addresses are what a captured graph reads)."""

    ids: Tensor  # (rows, 1)
    positions: Tensor  # (rows, 1)
    mask: Tensor  # (rows, 1, 1, columns) additive
    column: Tensor  # (1,) the step's column
    routing: SlotRouting


class StaticDecode:
    """Decode steps of ``model`` with static shapes (see the module docstring); ``capture``: replay CUDA graphs
    (default: when the model is on a GPU)."""

    def __init__(self, model: nn.Module, table: SlotTable, capture: bool | None = None) -> None:
        self.model, self.table = model, table
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.capture = self.device.type == "cuda" if capture is None else capture
        self._graphs: dict[int, tuple[tuple[Any, ...], Any, Tensor]] = {}
        self._inputs: dict[int, _Inputs] = {}
        self._pool: Any = None
        self.replays = 0  # steps served from a captured graph

    def applies(self, slots: list[int | None]) -> bool:
        """Whether every row's adapter (``None``: the base) is in the pool's slots and the kernels run here."""
        from ..routing.stacked import kernels_enabled

        return all(s is not None for s in slots) and kernels_enabled(self.device)

    def step(self, kv: BatchKV, tokens: list[int], slots: list[int], mask: Tensor, positions: Tensor) -> Tensor:
        """The next-token logits ``(n, vocab)`` of the ``n`` running rows (slot -1: the base model); ``mask`` and
        ``positions`` are :meth:`BatchKV.step_inputs`' (call :meth:`BatchKV.step_done` afterwards)."""
        n = len(tokens)
        rows = bucket(n)
        kv.reserve_rows(rows)
        inputs = self._inputs.get(rows) or self._new_inputs(rows)
        self._fill(inputs, kv, tokens, slots, mask, positions)
        run = self._runner(rows, inputs, kv)
        return run()[:n, -1]

    def _new_inputs(self, rows: int) -> _Inputs:
        on = {"device": self.device}
        layout = grouped_kernels().GroupedLayout(
            tokens=rows, slots=0, order=torch.arange(rows, dtype=torch.int32, **on),
            token_slot=torch.full((rows,), -1, dtype=torch.int32, **on),
            blocks=torch.zeros(0, 3, dtype=torch.int32, **on), decode=True)
        inputs = _Inputs(torch.zeros(rows, 1, dtype=torch.long, **on), torch.zeros(rows, 1, dtype=torch.long, **on),
                         torch.zeros(0, **on), torch.zeros(1, dtype=torch.long, **on), SlotRouting(layout))
        self._inputs[rows] = inputs
        return inputs

    def _fill(self, inputs: _Inputs, kv: BatchKV, tokens: list[int], slots: list[int], mask: Tensor,
              positions: Tensor) -> None:
        n, columns = len(tokens), kv.layers[0].k_buf.shape[2]
        rows = inputs.ids.shape[0]
        if inputs.mask.shape != (rows, 1, 1, columns):  # the buffers grew: a new mask (and graph)
            inputs.mask = torch.empty(rows, 1, 1, columns, dtype=self.dtype, device=self.device)
        additive = inputs.mask.view(rows, columns)  # written in place: a captured graph reads this storage
        additive.fill_(torch.finfo(self.dtype).min)
        additive[:n, kv.start : kv.end + 1].masked_fill_(mask.bool(), 0.0)
        additive[n:, kv.end] = 0.0  # padding rows attend to their own column only
        inputs.ids.zero_()[:n, 0] = torch.tensor(tokens, device=self.device)
        inputs.positions.zero_()[:n] = positions
        inputs.column.fill_(kv.end)
        token_slot = torch.full((rows,), -1, dtype=torch.int32)
        token_slot[:n] = torch.tensor(slots, dtype=torch.int32)
        inputs.routing.layout.token_slot.copy_(token_slot)

    def _forward(self, inputs: _Inputs, kv: BatchKV) -> Callable[[], Tensor]:
        rows = inputs.ids.shape[0]
        cache = Cache(layers=[_ColumnLayer(layer.k_buf, layer.v_buf, rows, inputs.column) for layer in kv.layers])

        def run() -> Tensor:
            with using(self.model, inputs.routing):
                return self.model(input_ids=inputs.ids, attention_mask=inputs.mask, position_ids=inputs.positions,
                                  past_key_values=cache, use_cache=True).logits
        return run

    def _runner(self, rows: int, inputs: _Inputs, kv: BatchKV) -> Callable[[], Tensor]:
        """The step for this bucket: a captured graph's replay, or the static forward run eagerly."""
        if not self.capture:
            return self._forward(inputs, kv)
        key = (kv.layers[0].k_buf.data_ptr(), inputs.mask.shape, self.table.reallocations)
        cached = self._graphs.get(rows)
        if cached is None or cached[0] != key:
            forward = self._forward(inputs, kv)
            try:
                self._graphs[rows] = (key, *self._capture(forward))
            except RuntimeError:  # e.g. an operation that cannot be captured: run eagerly from now on
                log.exception("CUDA graph capture of the decode step failed; decoding without graphs")
                self.capture = False
                self._graphs.clear()
                return forward
        _, graph, out = self._graphs[rows]

        def replay() -> Tensor:
            graph.replay()
            self.replays += 1
            return out
        return replay

    def _capture(self, forward: Callable[[], Tensor]) -> tuple[Any, Tensor]:
        """Warm up on a side stream (the step's writes are idempotent: same column, same values), then capture."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every bucket's graph
        with torch.cuda.graph(graph, pool=self._pool):
            out = forward()
        return graph, out

