"""The stacked path: many low-rank adapters applied to one batch by slot id (S-LoRA, METHODS.md entry 65).

S-LoRA's batched LoRA kernels (Punica's BGMV for decode, MBGMM for prefill: "batched gather matrix-vector /
matrix-matrix") compute, for row ``i`` with adapter slot ``s_i``,

    y_i = W0 x_i + B[s_i] (A[s_i] x_i)          # B, A: the slot's factors with the scale folded in

A :class:`SlotStack` holds one host layer's slot tensors; the adapter pool (:mod:`.pool`) decides which adapter sits
in which slot (a :class:`SlotTable` shared by every layer) and packs ``Adapter.factors()`` into them.

The product here is the padded form of MBGMM in plain PyTorch, which runs on any device: the rows are grouped by
slot into ``X[g, m]`` (``g``: slot ``lo + g`` of the range of slots in use, ``m``: the rows of that slot, padded to
the most rows any slot has), then two ``torch.bmm`` calls read the slot tensors *in place* (a slice, no gather):
``H = X A^T[lo:hi]``, ``D = H B^T[lo:hi]``, and ``D`` is added back to each row. Measured on CPU against the
alternatives (``benchmarks/mixed_batch.py``; docs/benchmarks.md, "Mixed-adapter batches"): gathering each row's
factors (``A[s]`` for the batch, Punica's layout) copies every adapter once per row, and ``torch.nn.functional
.grouped_mm`` loops over the groups in Python-visible ops on CPU; both were slower. The cost is the slots in the range
``lo..hi`` (the pool packs adapters into the lowest free slots, so the range stays compact) plus the padding of
uneven groups (activations only, small beside the weights at decode).

The factors are stored transposed, ``A^T[n, d_in, r_max]`` and ``B^T[n, r_max, d_out]``, the layout ``torch.bmm``
reads fastest (2-4x faster on CPU than transposed views of ``A[n, r_max, d_in]``, ``B[n, d_out, r_max]``). Adapters
of lower rank are zero-padded to the largest rank in the stack (``r_max`` grows, never shrinks).

Adapters in slots are the adapter pool's: frozen, never attached to the model as modules, applied only from the
slots. :meth:`SlotStack.apply` runs the padded grid when few tokens share each slot (decode:
:data:`MAX_TOKENS_PER_ADAPTER`) and the groups are even enough (:data:`MAX_PADDING`); otherwise (prefill) one pair of
products per slot's rows, the segment path's shape (:mod:`.rows`) read from the slot tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError
from .rows import RowRouting

# The stacked path is taken when the largest group of rows sharing an adapter holds at most MAX_TOKENS_PER_ADAPTER
# tokens and the padded grid has at most MAX_PADDING times the rows routed to an adapter. Both measured on CPU
# (benchmarks/mixed_batch.py and its layer-level skew check; docs/benchmarks.md, "Mixed-adapter batches").
MAX_TOKENS_PER_ADAPTER = 32
MAX_PADDING = 2.0


class SlotTable:
    """Adapter name -> slot, shared by the :class:`SlotStack` of every layer of one pool."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.slots: dict[str, int] = {}
        self.version = 0  # bumped on every change: keys the per-batch slot-id cache

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

    def groups(self, routing: RowRouting, device: torch.device) -> SlotGroups:
        """The batch's rows grouped by slot (see :class:`SlotGroups`), computed once per batch for every layer."""
        return routing.cached(("groups", id(self), self.version, device),
                              lambda: group_rows(routing.names, self.slots, device))


def group_rows(names: list[str | None], slot_of: dict[str, int], device: torch.device) -> SlotGroups:
    """Rows whose adapter has a slot in ``slot_of``, grouped by slot (the padded grid's layout)."""
    placed = sorted((slot_of[n], row) for row, n in enumerate(names) if n in slot_of)
    if not placed:
        return SlotGroups(torch.empty(0, dtype=torch.long, device=device), None, 0, 0, 0, False)
    lo, hi = placed[0][0], placed[-1][0] + 1
    seen: dict[int, int] = {}
    cells = []
    for slot, _ in placed:
        cells.append((slot - lo, seen.get(slot, 0)))
        seen[slot] = seen.get(slot, 0) + 1
    most = max(seen.values())
    order = [row for _, row in placed]
    rows = torch.tensor(order, dtype=torch.long, device=device)
    dense = (hi - lo) * most == len(placed)  # no padding: the grid is the rows in slot order
    index = None if dense else torch.tensor([g * most + m for g, m in cells], dtype=torch.long, device=device)
    return SlotGroups(rows, index, lo, hi, most, order == list(range(len(names))))


@dataclass(frozen=True)
class SlotGroups:
    """A batch's rows routed to slots, in slot order.

    ``rows``: their indices in the batch; ``cells``: each one's index in the padded ``(hi - lo) * most`` grid, or
    ``None`` when the grid has no padding (every slot in ``lo..hi`` has ``most`` rows); ``lo, hi``: the range of slots
    in use; ``most``: the most rows any slot has; ``in_order``: ``rows`` is the whole batch in its own order (no
    gather or scatter needed).
    """

    rows: Tensor
    cells: Tensor | None
    lo: int
    hi: int
    most: int
    in_order: bool

    def even(self) -> bool:
        """The padded grid has at most :data:`MAX_PADDING` times the rows."""
        return (self.hi - self.lo) * self.most <= MAX_PADDING * self.rows.numel()


class SlotStack:
    """One linear layer's slot tensors ``A^T[capacity, d_in, r_max]``, ``B^T[capacity, r_max, d_out]``."""

    def __init__(self, table: SlotTable, d_in: int, d_out: int, like: Tensor) -> None:
        self.table = table
        self.members: set[str] = set()  # adapters packed here (the slots of others are zero in this layer)
        n = table.capacity
        self.a_t = torch.zeros(n, d_in, 0, dtype=like.dtype, device=like.device)  # (n, d_in, r_max)
        self.b_t = torch.zeros(n, 0, d_out, dtype=like.dtype, device=like.device)  # (n, r_max, d_out)

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
        slot = self.table.slots[name]
        self.a_t[slot].zero_()
        self.b_t[slot].zero_()
        self.a_t[slot, :, :r] = a_eff.t()
        self.b_t[slot, :r] = b_eff.t()
        self.members.add(name)

    @torch.no_grad()
    def drop(self, name: str) -> None:
        """Zero ``name``'s slot (call before the table frees it)."""
        if name in self.members:
            slot = self.table.slots[name]
            self.a_t[slot].zero_()
            self.b_t[slot].zero_()
            self.members.discard(name)

    def nbytes(self) -> int:
        return self.a_t.numel() * self.a_t.element_size() + self.b_t.numel() * self.b_t.element_size()

    def apply(self, x: Tensor, base_out: Tensor, routing: RowRouting) -> Tensor:
        """``base_out + B[s_i] A[s_i] x_i`` for every row ``i`` routed to a slot (``x``: (B, ..., d_in)); other rows
        keep ``base_out``. The grid when few tokens share each slot and the groups are even, else per slot.

        Without autograd (serving) the products are added into ``base_out`` in place (the host layer's fresh output;
        only the routed rows change), saving a copy of the layer's output per kernel."""
        if not any(n in self.members for n in routing.adapters):
            return base_out
        g = self.table.groups(routing, x.device)
        tokens = x.numel() // (x.shape[0] * x.shape[-1])  # per row
        if g.most * tokens <= MAX_TOKENS_PER_ADAPTER and g.even():
            return self.apply_grid(x, base_out, routing)
        return self.apply_segments(x, base_out, routing)

    def apply_grid(self, x: Tensor, base_out: Tensor, routing: RowRouting) -> Tensor:
        """Rows grouped into the padded ``(slot, row)`` grid, two ``torch.bmm`` over the slots in use."""
        g = self.table.groups(routing, x.device)
        if not g.rows.numel():
            return base_out
        return grouped_product(x, base_out, self.a_t[g.lo:g.hi], self.b_t[g.lo:g.hi], g)

    def apply_segments(self, x: Tensor, base_out: Tensor, routing: RowRouting) -> Tensor:
        """One ``(x A^T) B^T`` per slot present in this layer, over that slot's rows (many tokens per adapter)."""
        inplace = not torch.is_grad_enabled()
        out = base_out
        for name, idx in routing.groups(x.device):
            if name not in self.members:  # not in the slots, or an adapter that does not target this layer
                continue
            slot = self.table.slots[name]
            whole = idx.numel() == x.shape[0]
            xs = x if whole else x.index_select(0, idx)
            h = xs.to(self.a_t.dtype) @ self.a_t[slot]
            if inplace and whole and out.dtype == h.dtype:
                out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.b_t[slot])
                continue
            delta = (h @ self.b_t[slot]).to(out.dtype)
            out = (out.add_(delta) if inplace else out + delta) if whole else _add_rows(out, idx, delta, inplace)
        return out


def grouped_product(x: Tensor, base_out: Tensor, a_t: Tensor, b_t: Tensor, g: SlotGroups) -> Tensor:
    """``base_out + B_s A_s x_i`` for the rows ``g`` groups, ``a_t (G, d_in, r)`` and ``b_t (G, r, d_out)`` being the
    factors of slots ``g.lo .. g.hi``: the padded grid and two ``torch.bmm``. Without autograd the products are added
    into ``base_out`` in place (``baddbmm`` straight into it when the rows are in slot order and unpadded)."""
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, d_in)
    tokens, d_in = x3.shape[1:]
    n_slots = g.hi - g.lo
    n_cells = n_slots * g.most
    xs = (x3 if g.in_order else x3.index_select(0, g.rows)).to(a_t.dtype)
    if g.cells is not None:  # pad uneven groups
        xs = xs.new_zeros(n_cells, tokens, d_in).index_copy(0, g.cells, xs)
    h = torch.bmm(xs.reshape(n_slots, g.most * tokens, d_in), a_t)  # (G, most T, r)
    out = base_out.reshape(x3.shape[0], tokens, -1)
    inplace = not torch.is_grad_enabled()
    if inplace and g.in_order and g.cells is None and out.dtype == h.dtype:
        out.view(n_slots, g.most * tokens, -1).baddbmm_(h, b_t)  # no delta tensor at all
        return base_out
    delta = torch.bmm(h, b_t).view(n_cells, tokens, -1).to(out.dtype)  # (G most, T, d_out)
    if g.cells is not None:
        delta = delta.index_select(0, g.cells)
    if g.in_order and g.cells is None and not inplace:
        return (out + delta).reshape(base_out.shape)
    return _add_rows(out, g.rows, delta, inplace).reshape(base_out.shape)


def apply_grouped(x: Tensor, base_out: Tensor, routing: RowRouting,
                  factors: dict[str, tuple[Tensor, Tensor]]) -> Tensor | None:
    """The grid for attached adapters given by their ``(B_eff, A_eff)`` (differentiable: multi-job training), ranks
    zero-padded to the largest; ``None`` when the groups are too uneven to pad (:data:`MAX_PADDING`)."""
    names = list(factors)
    g = routing.cached(("modules", tuple(names), x.device),
                       lambda: group_rows(routing.names, {n: i for i, n in enumerate(names)}, x.device))
    if not g.even():
        return None
    r_max = max(a.shape[0] for _, a in factors.values())
    a_t = torch.stack([_pad_rank(a.t(), r_max) for _, a in factors.values()])  # (G, d_in, r_max)
    b_t = torch.stack([_pad_rank(b, r_max).t() for b, _ in factors.values()])  # (G, r_max, d_out)
    return grouped_product(x, base_out, a_t, b_t, g)


def _pad_rank(m: Tensor, r_max: int) -> Tensor:
    """``m (n, r)`` with zero columns up to ``r_max`` (differentiable; no copy when ``r == r_max``)."""
    return m if m.shape[1] == r_max else F.pad(m, (0, r_max - m.shape[1]))


def stackable(adapter: nn.Module, kind: str) -> bool:
    """Whether ``adapter`` on a ``kind`` layer is exactly ``B_eff A_eff`` in its current mode: factorable, on a linear
    layer, no bias, no active dropout (the stacked path's and grouped product's condition)."""
    dropout = getattr(getattr(adapter, "config", None), "dropout", 0.0)
    return (kind == "linear" and adapter.capabilities.factorable and adapter.bias_delta() is None
            and (not dropout or not adapter.training))


def _add_rows(out: Tensor, rows: Tensor, delta: Tensor, inplace: bool) -> Tensor:
    """``out[rows] += delta`` (in place when ``inplace``, else a new tensor, for autograd)."""
    return out.index_add_(0, rows, delta) if inplace else out.index_add(0, rows, delta)
