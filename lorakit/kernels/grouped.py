"""Grouped multi-adapter LoRA in Triton: SGMV for prefill, BGMV for decode (S-LoRA, Punica).

For every token ``i`` of a batch whose adapter sits in slot ``s_i`` (``-1``: no adapter, the token keeps the base
output), with each slot's factors stored transposed and the scale folded into ``B``,

    y_i += B[s_i] (A[s_i] x_i)          # A^T[s]: (d_in, r_max), B^T[s]: (r_max, d_out); only the slot's own rank r_s

This is S-LoRA's batched LoRA computation (Sheng et al. 2023, "S-LoRA: Serving Thousands of Concurrent LoRA
Adapters") with Punica's two kernel shapes (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving"):

* SGMV, "segmented gather matrix-vector" (prefill): tokens sorted by slot form segments; each program takes one block
  of ``BLOCK_M`` sorted tokens of one segment and multiplies ``BLOCK_M x BLOCK_K`` tiles with ``tl.dot``.
* BGMV, "batched gather matrix-vector" (decode, about one token per adapter): one program per token, a
  matrix-vector product by elementwise multiply and ``tl.sum``, nothing padded along the tokens.

Each is a *shrink* ``h = x A^T[s]`` (``h``: ``(tokens, r_max)``, in sorted order) then an *expand*
``out += h B^T[s]``. The gather of ``x`` and the scatter into ``out`` go through the layout's ``order`` index inside
the kernels (no ``index_select`` / ``index_add`` launches); every ``(token, output block)`` pair belongs to one
program, so no atomics. Ranks may differ per slot: storage is padded to ``r_max``, but the kernels read each slot's
rank from ``ranks`` and never touch the padding (masks in the shrink, the loop bound in the expand); a slot of rank 0
(empty in this layer) costs one load per program. Accumulation is in float32, cast on store.

The :class:`GroupedLayout` (the sort and the block table) is computed once per batch on the host and shared by every
layer (:meth:`lorakit.routing.stacked.SlotTable.layout`). Block sizes are plain constants, not yet tuned on a GPU.

Triton is optional: this module imports without it (:func:`triton_available` says whether the kernels exist). On a
machine without a GPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` is set before this
module is imported (the tests do so).
"""
# No ``from __future__ import annotations``: Triton reads the kernels' ``tl.constexpr`` annotations as objects.
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import LorakitError

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels need the optional triton package
    triton = None

BLOCK_M = 16  # SGMV: sorted tokens per block (tl.dot needs at least 16); segments shorter on average run BGMV
BLOCK_K = 32  # shrink: the d_in tile
BLOCK_N = 64  # expand: the d_out tile
MAX_BLOCK_R = 64  # the rank tile: next power of two of r_max (at least 16 for tl.dot), at most this
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def triton_available() -> bool:
    """Whether triton is installed, so that :func:`grouped_lora` can run."""
    return triton is not None


def supports(x_dtype: torch.dtype, out_dtype: torch.dtype, factor_dtype: torch.dtype) -> bool:
    """Whether the kernels take these dtypes: ``x`` and ``out`` float32, float16 or bfloat16, the factors ``x``'s
    dtype or float32."""
    return x_dtype in FLOATS and out_dtype in FLOATS and factor_dtype in (x_dtype, torch.float32)


@dataclass(frozen=True)
class GroupedLayout:
    """Where each token of one batch meets its slot, shared by every layer of the batch.

    ``tokens``: the batch's token count ``N`` (rows of ``x2d`` / ``out2d``); ``slots``: the largest slot used plus
    one (0 when no token has a slot); ``order``: ``(M,)`` int32, the tokens
    that have a slot, sorted by slot (stable: in batch order within a slot); ``token_slot``: ``(M,)`` int32, the slot
    of each sorted token (BGMV); ``blocks``: ``(n_blocks, 3)`` int32, one row ``(slot, start, length)`` per block of at
    most ``BLOCK_M`` sorted tokens inside one segment, ``start`` indexing ``order`` (SGMV); ``decode``: whether
    :func:`grouped_lora` runs BGMV (segments shorter than ``BLOCK_M`` tokens on average) rather than SGMV.
    """

    tokens: int
    slots: int
    order: Tensor
    token_slot: Tensor
    blocks: Tensor
    decode: bool


def make_layout(token_slots: Tensor, device: torch.device | str | None = None,
                decode: bool | None = None) -> GroupedLayout:
    """The :class:`GroupedLayout` of a batch whose token ``i`` uses slot ``token_slots[i]`` (``-1``: none), computed
    on the host and copied to ``device`` (default: ``token_slots``' device) in one transfer. ``decode`` forces BGMV
    (``True``) or SGMV (``False``); by default BGMV when segments average fewer than ``BLOCK_M`` tokens."""
    if token_slots.dim() != 1 or token_slots.dtype not in INTEGERS:
        raise LorakitError(f"token_slots must be a 1-d integer tensor (one slot or -1 per token), got "
                           f"{token_slots.dtype} of shape {tuple(token_slots.shape)}")
    slots = token_slots.detach().to("cpu", torch.int64)
    if slots.numel() and int(slots.min()) < -1:
        raise LorakitError(f"token_slots holds {int(slots.min())}; a slot is >= 0, or -1 for no adapter")
    order = torch.argsort(slots, stable=True)
    order = order[slots[order] >= 0]  # -1 sorts first: tokens without an adapter leave the layout
    token_slot = slots[order]
    seg_slot, seg_len = torch.unique_consecutive(token_slot, return_counts=True)
    seg_start = seg_len.cumsum(0) - seg_len
    per_seg = (seg_len + BLOCK_M - 1) // BLOCK_M
    block_seg = torch.repeat_interleave(torch.arange(len(seg_len)), per_seg)
    first_block = torch.repeat_interleave(per_seg.cumsum(0) - per_seg, per_seg)  # of each block's segment
    offset = (torch.arange(len(block_seg)) - first_block) * BLOCK_M  # each block's first token in its segment
    blocks = torch.stack([seg_slot[block_seg], seg_start[block_seg] + offset,
                          (seg_len[block_seg] - offset).clamp(max=BLOCK_M)], dim=1)
    if decode is None:
        decode = len(seg_len) > 0 and len(order) < BLOCK_M * len(seg_len)
    packed = torch.cat([order, token_slot, blocks.flatten()]).to(torch.int32)
    packed = packed.to(token_slots.device if device is None else device)
    m = len(order)
    return GroupedLayout(tokens=len(slots), slots=int(seg_slot[-1]) + 1 if m else 0, order=packed[:m],
                         token_slot=packed[m : 2 * m], blocks=packed[2 * m :].view(-1, 3), decode=decode)


def grouped_lora(x2d: Tensor, out2d: Tensor, a_t: Tensor, b_t: Tensor, ranks: Tensor,
                 layout: GroupedLayout) -> None:
    """``out2d[i] += B^T[s_i]^T (A^T[s_i]^T x2d[i])`` in place for each token of ``layout`` (inference only).

    ``x2d (N, d_in)``, ``out2d (N, d_out)``: float32, float16 or bfloat16; ``a_t (n_slots, d_in, r_max)`` and
    ``b_t (n_slots, r_max, d_out)``: ``x2d``'s dtype or float32; ``ranks (n_slots,)`` int32, each slot's rank
    (``<= r_max``, not checked: that would wait for the device; 0: the slot is skipped). Any strides. Raises
    :class:`LorakitError` naming a mismatch.
    """
    _check(x2d, out2d, a_t, b_t, ranks, layout)
    m, r_max = layout.order.numel(), a_t.shape[2]
    if m == 0 or r_max == 0:
        return
    block_r = min(max(16, triton.next_power_of_2(r_max)), MAX_BLOCK_R)
    h = torch.empty(m, r_max, dtype=a_t.dtype, device=a_t.device)  # the shrink's output, sorted by slot
    if layout.decode:
        kernel, meta, programs, extra = _bgmv, layout.token_slot, m, {}
    else:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"  # as torch's own fp32 matmuls
        kernel, meta, programs = _sgmv, layout.blocks, layout.blocks.shape[0]
        extra = {"BLOCK_M": BLOCK_M, "PRECISION": precision}
    common = (ranks, layout.order, meta)
    kernel[(programs, math.ceil(r_max / block_r))](
        x2d, a_t, h, *common, x2d.shape[1], *x2d.stride(), *a_t.stride(), *h.stride(),
        EXPAND=False, BLOCK_K=BLOCK_K, BLOCK_N=block_r, **extra)
    kernel[(programs, math.ceil(out2d.shape[1] / BLOCK_N))](
        h, b_t, out2d, *common, out2d.shape[1], *h.stride(), *b_t.stride(), *out2d.stride(),
        EXPAND=True, BLOCK_K=block_r, BLOCK_N=BLOCK_N, **extra)


def _check(x2d: Tensor, out2d: Tensor, a_t: Tensor, b_t: Tensor, ranks: Tensor, layout: GroupedLayout) -> None:
    """Raise :class:`LorakitError` naming the first argument that does not fit :func:`grouped_lora`."""
    if not triton_available():
        raise LorakitError("the grouped LoRA kernels need triton, which is not installed (pip install triton)")
    def require(ok: bool, rule: str) -> None:  # runs on every layer's call: the message is built only on failure
        if not ok:
            shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in
                               (("x2d", x2d), ("out2d", out2d), ("a_t", a_t), ("b_t", b_t), ("ranks", ranks)))
            raise LorakitError(f"grouped_lora: {rule}; got {shapes}")

    require(x2d.dim() == out2d.dim() == 2 and a_t.dim() == b_t.dim() == 3 and ranks.dim() == 1,
            "x2d and out2d must be 2-d, a_t and b_t 3-d, ranks 1-d")
    require(x2d.shape[0] == out2d.shape[0] == layout.tokens,
            f"x2d, out2d and the layout ({layout.tokens} tokens) must have as many tokens")
    require(a_t.shape[1] == x2d.shape[1], "a_t's d_in (dim 1) must equal x2d's dim 1")
    require(b_t.shape[2] == out2d.shape[1], "b_t's d_out (dim 2) must equal out2d's dim 1")
    require(a_t.shape[2] == b_t.shape[1], "a_t's r_max (dim 2) must equal b_t's (dim 1)")
    require(a_t.shape[0] == b_t.shape[0] == ranks.shape[0], "a_t, b_t and ranks must have one entry per slot")
    require(layout.slots <= ranks.shape[0], f"the layout uses slot {layout.slots - 1}, past the last slot")
    require(ranks.dtype == torch.int32, f"ranks must be int32, not {ranks.dtype}")
    require(a_t.dtype == b_t.dtype and supports(x2d.dtype, out2d.dtype, a_t.dtype),
            f"dtypes x2d {x2d.dtype}, out2d {out2d.dtype}, a_t {a_t.dtype}, b_t {b_t.dtype} are not supported "
            "(x2d and out2d: float32, float16 or bfloat16; a_t and b_t: both x2d's dtype or float32)")
    devices = {t.device for t in (x2d, out2d, a_t, b_t, ranks, layout.order)}
    require(len(devices) == 1, f"x2d, out2d, a_t, b_t, ranks and the layout must share one device, not "
                               f"{sorted(map(str, devices))}")


if triton is not None:
    @triton.jit
    def _lengths(rank, dim, EXPAND: tl.constexpr):
        """``(reduced length, output length)``: the shrink reduces ``d_in`` into the slot's rank, the expand reduces
        the rank into ``d_out``."""
        if EXPAND:
            return rank, dim
        return dim, rank

    @triton.jit
    def _sgmv(src, w, dst, ranks, order, blocks, dim,
              stride_sm, stride_sk, stride_ws, stride_wk, stride_wn, stride_dm, stride_dn,
              EXPAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr):
        """SGMV, one block of sorted tokens of one slot (program 0) by one ``BLOCK_N`` column tile (program 1).

        Shrink (``EXPAND`` false): ``dst[sorted] = src[order] @ w[slot][:dim, :rank]`` (``dim``: d_in).
        Expand (``EXPAND`` true): ``dst[order] += src[sorted] @ w[slot][:rank, :dim]`` (``dim``: d_out).
        """
        block = tl.program_id(0)
        slot = tl.load(blocks + 3 * block).to(tl.int64)
        k_len, n_len = _lengths(tl.load(ranks + slot), dim, EXPAND)
        n0 = tl.program_id(1) * BLOCK_N
        if n0 >= n_len or k_len == 0:  # a rank tile past this slot's rank, or an empty slot
            return
        start = tl.load(blocks + 3 * block + 1)
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < tl.load(blocks + 3 * block + 2)
        sorted_rows = (start + offs_m).to(tl.int64)
        token_rows = tl.load(order + sorted_rows, mask=mask_m, other=0).to(tl.int64)
        src_rows = sorted_rows if EXPAND else token_rows
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_len
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_len, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_len
            s = tl.load(src + src_rows[:, None] * stride_sm + offs_k[None, :] * stride_sk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(w + slot * stride_ws + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                         mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(s.to(wt.dtype), wt, acc, input_precision=PRECISION)
        dst_rows = token_rows if EXPAND else sorted_rows
        ptrs = dst + dst_rows[:, None] * stride_dm + offs_n[None, :] * stride_dn
        mask = mask_m[:, None] & mask_n[None, :]
        if EXPAND:
            acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, acc.to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _bgmv(src, w, dst, ranks, order, token_slot, dim,
              stride_sm, stride_sk, stride_ws, stride_wk, stride_wn, stride_dm, stride_dn,
              EXPAND: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """BGMV, one sorted token (program 0) by one ``BLOCK_N`` column tile (program 1); the same shrink and expand
        as :func:`_sgmv`, as matrix-vector products."""
        m = tl.program_id(0)
        slot = tl.load(token_slot + m).to(tl.int64)
        if slot < 0:  # a static layout's token without an adapter (lorakit.serve.graphs)
            return
        k_len, n_len = _lengths(tl.load(ranks + slot), dim, EXPAND)
        n0 = tl.program_id(1) * BLOCK_N
        if n0 >= n_len or k_len == 0:
            return
        token_row = tl.load(order + m).to(tl.int64)
        src_row = m.to(tl.int64) if EXPAND else token_row
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_len
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, k_len, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_len
            s = tl.load(src + src_row * stride_sm + offs_k * stride_sk, mask=mask_k, other=0.0)
            wt = tl.load(w + slot * stride_ws + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                         mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc += tl.sum(s.to(tl.float32)[:, None] * wt.to(tl.float32), axis=0)
        ptrs = dst + (token_row if EXPAND else m.to(tl.int64)) * stride_dm + offs_n * stride_dn
        if EXPAND:
            acc += tl.load(ptrs, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(ptrs, acc.to(dst.dtype.element_ty), mask=mask_n)
