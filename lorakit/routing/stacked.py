"""The stacked path: many low-rank adapters applied to one batch by slot id (S-LoRA, METHODS.md entry 65).

S-LoRA's batched LoRA kernels (Punica's BGMV for decode, MBGMM for prefill: "batched gather matrix-vector /
matrix-matrix") compute, for row ``i`` with adapter slot ``s_i``,

    y_i = W0 x_i + B[s_i] (A[s_i] x_i)          # B, A: the slot's factors with the scale folded in

A :class:`SlotStack` holds one host layer's slot tensors; the adapter pool (:mod:`.pool`) decides which adapter sits
in which slot (a :class:`SlotTable` shared by every layer) and packs ``Adapter.factors()`` into them.

The product here is the padded form of MBGMM in plain PyTorch, which runs on any device: the rows are grouped by
slot into ``X[g, m]`` (``g``: the ``g``-th slot in use, ``m``: the rows of that slot, padded to the most rows any of
these slots has), then two ``torch.bmm`` calls read those slots' factors (a slice of the slot tensors when the slots
in use are contiguous, else one gather of them): ``H = X A^T[slots]``, ``D = H B^T[slots]``, and ``D`` is added back
to each row. Measured on CPU against the alternatives (``benchmarks/mixed_batch.py``; docs/benchmarks.md,
"Mixed-adapter batches"): gathering each row's factors (``A[s]`` for the batch, Punica's layout) copies every adapter
once per row, and ``torch.nn.functional.grouped_mm`` loops over the groups in Python-visible ops on CPU; both were
slower.

A :class:`SlotPlan` (one per batch, shared by every layer) decides which rows go in the grid, by the :class:`GridRule`
of the batch's device: a slot whose rows hold more than ``max_tokens`` tokens (prefill), or whose many rows would pad
the grid beyond ``max_padding`` times its rows (a popular adapter in a skewed decode batch), runs alone, one pair of
products over its rows (the segment path's shape, read from the slot tensors); the rest share the grid.

The factors are stored transposed, ``A^T[n, d_in, r_max]`` and ``B^T[n, r_max, d_out]``, the layout ``torch.bmm``
reads fastest (2-4x faster on CPU than transposed views of ``A[n, r_max, d_in]``, ``B[n, d_out, r_max]``). Adapters
of lower rank are zero-padded to the largest rank in the stack (``r_max`` grows, never shrinks).

On a GPU, serving (no autograd) with triton installed, :meth:`SlotStack.apply` runs the Triton kernels of
:mod:`lorakit.kernels.grouped` instead: Punica's SGMV (prefill) or BGMV (decode), two launches per layer whatever the
number of adapters, the gather and scatter inside the kernels, each slot computed over its own rank only (the stack
keeps a per-slot ``ranks`` tensor). Their layout (the batch's tokens sorted by slot, the block table) is computed
once per batch for every layer, like the plan. :func:`set_kernel_backend` chooses between the two paths; with
autograd (training, input gradients) the PyTorch product always runs. The kernels are checked against the PyTorch
product under Triton's interpreter on CPU (tests/test_grouped_kernels.py); their speed on a GPU is not yet measured.

Adapters in slots are the adapter pool's: frozen, never attached to the model as modules, applied only from the
slots. The same plan and product also serve attached adapters routed per row when each is exactly ``B_eff A_eff``
(:func:`apply_grouped`: multi-job training, differentiable).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError

if TYPE_CHECKING:
    from ..kernels.grouped import GroupedLayout
    from .rows import RowRouting


@dataclass(frozen=True)
class GridRule:
    """A slot's rows join the padded grid when they hold at most ``max_tokens`` tokens, and while the grid keeps at
    most ``max_padding`` times the rows it holds; the other slots run alone, one product pair each."""

    max_tokens: float
    max_padding: float


# Per device type, for the PyTorch product. CPU: measured (benchmarks/mixed_batch.py and its layer-level skew check;
# docs/benchmarks.md, "Mixed-adapter batches"): one product pair per large group is faster than padding it.
# Accelerators: every slot in one grid (one launch pair per layer instead of one per group: a prefill with 16 adapters
# spent 35% of GPU time in per-group index_select / index_add_, issue 16), padding up to 4x. Not measured on a GPU.
# Serving on a GPU with triton installed takes the Triton kernels instead (set_kernel_backend); this rule then serves
# the autograd path and GPUs without triton.
GRID_RULES: dict[str, GridRule] = {"cpu": GridRule(max_tokens=32, max_padding=2.0)}
ACCELERATOR_RULE = GridRule(max_tokens=math.inf, max_padding=4.0)


def grid_rule(device: torch.device) -> GridRule:
    """The :class:`GridRule` for ``device``'s type."""
    return GRID_RULES.get(device.type, ACCELERATOR_RULE)


Backend = Literal["auto", "torch", "triton"]
_backend: Backend = "auto"


def set_kernel_backend(backend: Backend) -> Backend:
    """Choose how :meth:`SlotStack.apply` computes the slot products without autograd; returns the previous choice.

    ``"auto"`` (the default): the Triton kernels (:mod:`lorakit.kernels.grouped`) for CUDA inputs when triton is
    installed, else the PyTorch product. ``"torch"``: always the PyTorch product. ``"triton"``: the kernels on any
    device (on CPU only under Triton's interpreter: ``TRITON_INTERPRET=1`` set before the kernels are first used; the
    tests do so). Either way the kernels run only where they apply (float32, float16 or bfloat16; no autograd).
    """
    global _backend
    if backend not in ("auto", "torch", "triton"):
        raise LorakitError(f"kernel backend {backend!r} is invalid: 'auto', 'torch' or 'triton'")
    if backend == "triton" and not grouped_kernels().triton_available():
        raise LorakitError("kernel backend 'triton' needs triton, which is not installed (pip install triton)")
    previous, _backend = _backend, backend
    return previous


@functools.cache
def grouped_kernels() -> ModuleType:
    """:mod:`lorakit.kernels.grouped`, imported on first use (CPU-only users never import triton) and then kept, so
    a layer's forward pays no import."""
    from ..kernels import grouped
    return grouped


def kernels_enabled(device: torch.device) -> bool:
    """Whether :func:`set_kernel_backend` lets the Triton kernels run on ``device`` and triton is installed."""
    if _backend == "torch" or not (device.type == "cuda" or _backend == "triton"):
        return False
    return grouped_kernels().triton_available()


def _kernels_apply(x: Tensor, base_out: Tensor, factors: Tensor) -> bool:
    """Whether the Triton kernels compute this product (see :func:`set_kernel_backend`)."""
    if torch.is_grad_enabled() or not kernels_enabled(x.device):
        return False
    return base_out.is_contiguous() and grouped_kernels().supports(x.dtype, base_out.dtype, factors.dtype)


class SlotTable:
    """Adapter name -> slot, shared by the :class:`SlotStack` of every layer of one pool."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.slots: dict[str, int] = {}
        self.version = 0  # bumped on every change: keys the per-batch slot-id cache
        self.reallocations = 0  # bumped when a stack's slot tensors are replaced (captured decode graphs read them)

    def assign(self, name: str) -> int:
        free = sorted(set(range(self.capacity)) - set(self.slots.values()))
        if not free:
            raise LorakitError(f"all {self.capacity} slots are taken; free one before placing {name!r}")
        self.slots[name] = free[0]
        self.version += 1
        return free[0]

    def free(self, name: str) -> int:
        self.version += 1
        return self.slots.pop(name)

    def plan(self, routing: RowRouting, tokens: int, device: torch.device) -> SlotPlan:
        """The batch's :class:`SlotPlan` for rows of ``tokens`` tokens, computed once per batch for every layer."""
        return routing.cached(("plan", id(self), self.version, tokens, device),
                              lambda: plan_rows(routing.names, self.slots, tokens, device))

    def layout(self, routing: RowRouting, tokens: int, device: torch.device) -> GroupedLayout:
        """The batch's :class:`~lorakit.kernels.grouped.GroupedLayout` for rows of ``tokens`` tokens (each token: its
        row's slot, or -1), computed once per batch for every layer."""
        def make() -> GroupedLayout:
            rows = torch.tensor([-1 if n is None else self.slots.get(n, -1) for n in routing.names])
            return grouped_kernels().make_layout(rows.repeat_interleave(tokens), device)

        return routing.cached(("layout", id(self), self.version, tokens, device), make)


def plan_rows(names: list[str | None], slot_of: dict[str, int], tokens: int, device: torch.device,
              max_tokens: float | None = None) -> SlotPlan:
    """Rows whose adapter has a slot in ``slot_of``: which run alone per slot (more than ``max_tokens`` tokens,
    default the device's :func:`grid_rule`, or too many rows to pad) and which share the padded grid."""
    rule = grid_rule(device)
    limit = rule.max_tokens if max_tokens is None else max_tokens
    by_slot: dict[int, list[int]] = {}
    for row, name in enumerate(names):
        if name in slot_of:
            by_slot.setdefault(slot_of[name], []).append(row)
    alone = [s for s, rows in by_slot.items() if len(rows) * tokens > limit]
    grid = sorted((s for s in by_slot if s not in alone), key=lambda s: len(by_slot[s]), reverse=True)
    while grid and len(grid) * len(by_slot[grid[0]]) > rule.max_padding * sum(len(by_slot[s]) for s in grid):
        alone.append(grid.pop(0))  # the largest group pads the others most: it runs alone
    grid.sort()
    most = max((len(by_slot[s]) for s in grid), default=0)
    order = [row for s in grid for row in by_slot[s]]
    cells = [g * most + m for g, s in enumerate(grid) for m in range(len(by_slot[s]))]
    dense = len(cells) == len(grid) * most
    return SlotPlan(
        slots=grid,
        slot_index=torch.tensor(grid, dtype=torch.long, device=device),
        rows=torch.tensor(order, dtype=torch.long, device=device),
        cells=None if dense else torch.tensor(cells, dtype=torch.long, device=device),
        most=most,
        in_order=order == list(range(len(names))),
        alone=[(s, torch.tensor(by_slot[s], dtype=torch.long, device=device), len(by_slot[s]) == len(names),
                _span(by_slot[s])) for s in sorted(alone)],
    )


def _span(rows: list[int]) -> tuple[int, int] | None:
    """``(start, length)`` when ``rows`` are consecutive (a batch grouped by adapter), else ``None``."""
    return (rows[0], len(rows)) if rows[-1] - rows[0] + 1 == len(rows) else None


@dataclass(frozen=True)
class SlotPlan:
    """How one batch's rows meet their slots' factors.

    ``slots``: the slots of the grid, ascending (``slot_index``: the same as a tensor); ``rows``: the grid's rows in
    slot order; ``cells``: each one's index in the padded ``len(slots) * most`` grid, or ``None`` when there is no
    padding; ``most``: the most rows any grid slot has; ``in_order``: ``rows`` is the whole batch in its own order (no
    gather or scatter needed); ``alone``: ``(slot, rows, whole_batch, span)`` of the slots run one product pair each,
    ``span`` = ``(start, length)`` when their rows are consecutive (sliced, not gathered and scattered).
    """

    slots: list[int]
    slot_index: Tensor
    rows: Tensor
    cells: Tensor | None
    most: int
    in_order: bool
    alone: list[tuple[int, Tensor, bool, tuple[int, int] | None]]

    def select(self, stacked: Tensor) -> Tensor:
        """The grid slots' entries of ``stacked`` (one per slot): a slice when they are contiguous, else a gather."""
        lo, hi = self.slots[0], self.slots[-1] + 1
        return stacked[lo:hi] if hi - lo == len(self.slots) else stacked.index_select(0, self.slot_index)


class SlotStack:
    """One linear layer's slot tensors ``A^T[capacity, d_in, r_max]``, ``B^T[capacity, r_max, d_out]``."""

    def __init__(self, table: SlotTable, d_in: int, d_out: int, like: Tensor) -> None:
        self.table = table
        self.members: set[str] = set()  # adapters packed here (the slots of others are zero in this layer)
        n = table.capacity
        self.a_t = torch.zeros(n, d_in, 0, dtype=like.dtype, device=like.device)  # (n, d_in, r_max)
        self.b_t = torch.zeros(n, 0, d_out, dtype=like.dtype, device=like.device)  # (n, r_max, d_out)
        self.ranks = torch.zeros(n, dtype=torch.int32, device=like.device)  # each slot's own rank here (0: empty)

    @property
    def rank(self) -> int:
        return self.a_t.shape[-1]

    @torch.no_grad()
    def put(self, name: str, b_eff: Tensor, a_eff: Tensor) -> None:
        """Pack ``name``'s ``B_eff (d_out, r)``, ``A_eff (r, d_in)`` into its slot, growing ``r_max`` if needed."""
        r = a_eff.shape[0]
        grow = r - self.rank
        if grow > 0:
            self.a_t = F.pad(self.a_t, (0, grow))
            self.b_t = F.pad(self.b_t, (0, 0, 0, grow))
            self.table.reallocations += 1
        slot = self.table.slots[name]
        self.a_t[slot].zero_()
        self.b_t[slot].zero_()
        self.a_t[slot, :, :r] = a_eff.t()
        self.b_t[slot, :r] = b_eff.t()
        self.ranks[slot] = r
        self.members.add(name)

    @torch.no_grad()
    def drop(self, name: str) -> None:
        """Zero ``name``'s slot (call before the table frees it)."""
        if name in self.members:
            slot = self.table.slots[name]
            self.a_t[slot].zero_()
            self.b_t[slot].zero_()
            self.ranks[slot] = 0
            self.members.discard(name)

    def nbytes(self) -> int:
        return self.a_t.numel() * self.a_t.element_size() + self.b_t.numel() * self.b_t.element_size()

    def apply(self, x: Tensor, base_out: Tensor, routing: RowRouting) -> Tensor:
        """``base_out + B[s_i] A[s_i] x_i`` for every row ``i`` routed to a slot (``x``: (B, ..., d_in)); other rows
        keep ``base_out``.

        Without autograd (serving) the products are added into ``base_out`` in place (the host layer's fresh output;
        only the routed rows change), saving a copy of the layer's output per kernel; there the Triton kernels run
        when :func:`set_kernel_backend` allows it, else :func:`grouped_product`."""
        present = {self.table.slots[n] for n in routing.adapters if n in self.members}
        if not present:
            return base_out
        tokens = x.numel() // (x.shape[0] * x.shape[-1])
        if _kernels_apply(x, base_out, self.a_t):
            layout = self.table.layout(routing, tokens, x.device)
            grouped_kernels().grouped_lora(x.reshape(-1, x.shape[-1]), base_out.view(-1, base_out.shape[-1]),
                                           self.a_t, self.b_t, self.ranks, layout)
            return base_out
        plan = self.table.plan(routing, tokens, x.device)
        return grouped_product(x, base_out, self.a_t, self.b_t, plan, present)


def grouped_product(x: Tensor, base_out: Tensor, a_t: Tensor, b_t: Tensor, plan: SlotPlan,
                    present: set[int] | None = None) -> Tensor:
    """``base_out + B_s A_s x_i`` for the rows ``plan`` places, ``a_t (n, d_in, r)`` and ``b_t (n, r, d_out)`` being
    every slot's factors; slots outside ``present`` (zero in this layer) are skipped where they run alone."""
    out = _grid(x, base_out, a_t, b_t, plan) if plan.slots else base_out
    inplace = not torch.is_grad_enabled()
    sliced = any(span is not None and not whole for _, _, whole, span in plan.alone)
    if sliced and not inplace and out is base_out:
        out = base_out.clone()  # slices of our own copy are added in place (autograd records them)
    for slot, idx, whole, span in plan.alone:
        if present is not None and slot not in present:
            continue
        xs = x if whole else x.narrow(0, *span) if span else x.index_select(0, idx)
        h = xs.to(a_t.dtype) @ a_t[slot]
        if inplace and whole and out.dtype == h.dtype:
            out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b_t[slot])
            continue
        delta = (h @ b_t[slot]).to(out.dtype)
        if whole:
            out = out.add_(delta) if inplace else out + delta
        elif span is not None and (inplace or sliced):
            out.narrow(0, *span).add_(delta)
        else:
            out = _add_rows(out, idx, delta, inplace)
    return out


def _grid(x: Tensor, base_out: Tensor, a_t: Tensor, b_t: Tensor, plan: SlotPlan) -> Tensor:
    """The padded grid of the plan's grid slots and two ``torch.bmm``. Without autograd the products are added into
    ``base_out`` in place (``baddbmm`` straight into it when the rows are in slot order and unpadded)."""
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, d_in)
    tokens, d_in = x3.shape[1:]
    n_slots, n_cells = len(plan.slots), len(plan.slots) * plan.most
    a_sel, b_sel = plan.select(a_t), plan.select(b_t)
    xs = (x3 if plan.in_order else x3.index_select(0, plan.rows)).to(a_t.dtype)
    if plan.cells is not None:  # pad uneven groups
        xs = xs.new_zeros(n_cells, tokens, d_in).index_copy(0, plan.cells, xs)
    h = torch.bmm(xs.reshape(n_slots, plan.most * tokens, d_in), a_sel)  # (G, most T, r)
    out = base_out.reshape(x3.shape[0], tokens, -1)
    inplace = not torch.is_grad_enabled()
    if inplace and plan.in_order and plan.cells is None and out.dtype == h.dtype:
        out.view(n_slots, plan.most * tokens, -1).baddbmm_(h, b_sel)  # no delta tensor at all
        return base_out
    delta = torch.bmm(h, b_sel).view(n_cells, tokens, -1).to(out.dtype)  # (G most, T, d_out)
    if plan.cells is not None:
        delta = delta.index_select(0, plan.cells)
    if plan.in_order:  # the rows are the batch in order: a plain add, no scatter
        return (out.add_(delta) if inplace else out + delta).reshape(base_out.shape)
    return _add_rows(out, plan.rows, delta, inplace).reshape(base_out.shape)


def apply_grouped(x: Tensor, base_out: Tensor, routing: RowRouting,
                  factors: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
    """The plan and product for attached adapters given by their ``(B_eff, A_eff)`` (differentiable: multi-job
    training), ranks zero-padded to the largest. Any number of tokens per adapter joins the grid: with autograd the
    grid beat one product pair per adapter up to 256 tokens per adapter (layer level, docs/benchmarks.md)."""
    names = list(factors)
    tokens = x.numel() // (x.shape[0] * x.shape[-1])
    slot_of = {n: i for i, n in enumerate(names)}
    plan = routing.cached(("modules", tuple(names), tokens, x.device),
                          lambda: plan_rows(routing.names, slot_of, tokens, x.device, max_tokens=float("inf")))
    r_max = max(a.shape[0] for _, a in factors.values())
    a_t = torch.stack([_pad_rank(a.t(), r_max) for _, a in factors.values()])  # (G, d_in, r_max)
    b_t = torch.stack([_pad_rank(b, r_max).t() for b, _ in factors.values()])  # (G, r_max, d_out)
    return grouped_product(x, base_out, a_t, b_t, plan)


def _pad_rank(m: Tensor, r_max: int) -> Tensor:
    """``m (n, r)`` with zero columns up to ``r_max`` (differentiable; no copy when ``r == r_max``)."""
    return m if m.shape[1] == r_max else F.pad(m, (0, r_max - m.shape[1]))


def stackable(adapter: nn.Module, kind: str) -> bool:
    """Whether ``adapter`` on a ``kind`` layer is exactly ``B_eff A_eff`` in its current mode: factorable, on a linear
    layer, no bias, not stochastic (no active dropout): the stacked path's and grouped product's condition."""
    return (kind == "linear" and adapter.capabilities.factorable and adapter.bias_delta() is None
            and not adapter.stochastic)


def _add_rows(out: Tensor, rows: Tensor, delta: Tensor, inplace: bool) -> Tensor:
    """``out[rows] += delta`` (in place when ``inplace``, else a new tensor, for autograd)."""
    return out.index_add_(0, rows, delta) if inplace else out.index_add(0, rows, delta)
