"""Launchers of the kernels: the step's segment plan, then shrink / expand / blocks on torch tensors.

Tile sizes come from a fixed table, not @triton.autotune: autotune needs a GPU even to interpret,
and a table keeps the kernels that CI interprets and compiles the ones that run.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

from mole_serve.lora.backends.triton import kernels
from mole_serve.lora.stacks import GroupStack

# The kernels were decorated under TRITON_INTERPRET=1 (tests on CPU tensors): bf16 then needs its
# fp32 cast before tl.dot (the interpreter multiplies bf16's raw bits, triton#11584).
INTERPRETED = not isinstance(kernels.shrink_kernel, triton.runtime.JITFunction)

SHRINK_BLOCK_K = 64  # d_in per step of the shrink's reduction loop
SHRINK_MAX_BLOCK_N = 64  # rank columns (n*r) per program
EXPAND_BLOCK_N = 64  # output columns per program
EXPAND_MAX_BLOCK_R = 64  # rank rows per step of the expand's reduction loop
BLOCKS_BLOCK_D, BLOCKS_BLOCK_O = 64, 64  # MELoRA: a block's input and output features per step


def _pow2_at_least_16(n: int) -> int:
    """tl.dot needs every dimension >= 16 on the GPU; arange needs powers of two."""
    return max(16, triton.next_power_of_2(n))


@dataclass
class Segments:
    """Rows that share their C slots, cut into tiles of block_m rows (see kernels.py)."""

    tiles: torch.Tensor  # int32 [num_tiles, 3]: first row, end row of its segment, segment
    seg_slots: torch.Tensor  # int32 [S, C]
    seg_ranks: torch.Tensor  # int32 [S, C]: each column's slot's own rank (0: the zero slot)
    block_m: int
    rank: int  # the largest column rank: the ops run at it, bounded by the stack's

    @property
    def num_columns(self) -> int:
        return self.seg_slots.shape[1]


def plan(spans: Sequence[tuple[int, int]], seg_slots: torch.Tensor, seg_ranks: list[list[int]]) -> Segments:
    """spans[s] = (first row, length) of segment s, whose slots are seg_slots[s] ([S, C], on the
    device) of ranks seg_ranks[s]. Tiles of 16 rows when every segment is that short (decode), else
    of up to 64."""
    longest = max((n for _, n in spans), default=1)
    block_m = min(64, _pow2_at_least_16(longest))
    tiles = [(row, r0 + n, s) for s, (r0, n) in enumerate(spans) for row in range(r0, r0 + n, block_m)]
    device = seg_slots.device
    return Segments(
        torch.tensor(tiles, dtype=torch.int32).view(-1, 3).to(device, non_blocking=True),
        seg_slots.to(torch.int32).contiguous(),
        torch.tensor(seg_ranks, dtype=torch.int32).view(seg_slots.shape).to(device, non_blocking=True),
        block_m,
        max((max(r) for r in seg_ranks), default=0),
    )


def _dot_fp32(dtype: torch.dtype) -> bool:
    return INTERPRETED and dtype == torch.bfloat16


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def shrink(x: torch.Tensor, stack: GroupStack, seg: Segments) -> torch.Tensor:
    """z[t, c] = A[slot(t, c)] @ x[t], fp32 and unweighted, at the segments' rank R (bounded by the
    stack's r): each column reads its slot's own rank rows of each module block. x: [T, d_in]; A:
    [slots, n*r, d_in] with unit stride rows. -> z: [T, C, n*R] (every row of x must lie in a segment)."""
    A = stack.A
    if A.stride(-1) != 1:
        raise ValueError("the triton shrink reads A's rows with unit stride")
    x = _rows_contiguous(x)
    T, d_in = x.shape
    rank = min(seg.rank, stack.rank)
    nr, C = len(stack.B) * rank, seg.num_columns
    z = torch.empty(T, C, nr, dtype=torch.float32, device=x.device)
    if not len(seg.tiles):  # no rows: a grid of zero programs is not a launch CUDA accepts
        return z
    block_n = min(SHRINK_MAX_BLOCK_N, _pow2_at_least_16(nr))
    grid = (len(seg.tiles), C, triton.cdiv(nr, block_n))
    kernels.shrink_kernel[grid](
        x,
        A,
        z,
        seg.tiles,
        seg.seg_slots,
        seg.seg_ranks,
        d_in,
        rank,
        stack.rank,
        nr,
        C,
        x.stride(0),
        A.stride(0),
        A.stride(1),
        z.stride(0),
        z.stride(1),
        BLOCK_M=seg.block_m,
        BLOCK_N=block_n,
        BLOCK_K=SHRINK_BLOCK_K,
        DOT_FP32=_dot_fp32(x.dtype),
    )
    return z


class BTables:
    """Per module group, the device table of its B stacks' addresses and (d_out_j, c0_j): the
    expand reaches every module of a fused group in one launch. Rebuilt when a stack is replaced
    (the pool re-allocates its stacks whenever their rank grows or shrinks); the tables of stacks
    that are gone are dropped then, so resizes do not pile them up."""

    def __init__(self) -> None:
        # key -> (addresses [n] int64, (d_out_j, c0_j) [n, 2] int32, the stack's first B while it lives)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor, weakref.ref]] = {}

    def get(self, stack: GroupStack) -> tuple[torch.Tensor, torch.Tensor]:
        pointers = tuple(B.data_ptr() for B in stack.B)
        key = (pointers, tuple(stack.out_columns))
        hit = self._tables.get(key)
        if hit is None:
            self._tables = {k: v for k, v in self._tables.items() if v[2]() is not None}
            device = stack.A.device
            meta = [(c1 - c0, c0) for c0, c1 in stack.out_columns]
            hit = self._tables[key] = (
                torch.tensor(pointers, dtype=torch.int64, device=device),
                torch.tensor(meta, dtype=torch.int32, device=device),
                weakref.ref(stack.B[0]),
            )
        return hit[0], hit[1]


def expand(
    z: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor, stack: GroupStack, seg: Segments, tables: BTables
) -> None:
    """out += sum_c w[t, c] * B_j[slot(t, c)] @ z[t, c, module j's rank rows], for every module j,
    each column over its slot's own rank rows. z: [T, C, n*R] fp32 (shrink's, at its rank R);
    weights: [T, C] or [1, C] (per column) or [T, n, C] (per module and column), or None (all 1);
    out: [T, sum d_out_j], updated in place."""
    if any(B.dtype != out.dtype or not B.is_contiguous() for B in stack.B):
        raise ValueError("the triton expand needs contiguous B stacks in the output's dtype")
    if out.stride(-1) != 1:
        raise ValueError("the triton expand writes rows of out with unit column stride")
    if not len(seg.tiles):
        return
    n = len(stack.B)
    r = z.shape[2] // n
    b_table, b_meta = tables.get(stack)
    strides: tuple[int, ...]  # w's (token, column, block) strides
    if weights is None:
        w, strides = z, (0, 0, 0)  # never read
    elif weights.dim() == 3:
        w, strides = weights, weights.stride()
    else:
        w, strides = weights, (0 if weights.shape[0] == 1 else weights.stride(0), 0, weights.stride(1))
    widest = max(c1 - c0 for c0, c1 in stack.out_columns)
    grid = (len(seg.tiles), triton.cdiv(widest, EXPAND_BLOCK_N), n)
    kernels.expand_kernel[grid](
        z,
        w,
        out,
        b_table,
        b_meta,
        seg.tiles,
        seg.seg_slots,
        seg.seg_ranks,
        r,
        stack.rank,
        seg.num_columns,
        z.stride(0),
        z.stride(1),
        *strides,
        out.stride(0),
        HAS_WEIGHTS=weights is not None,
        BLOCK_M=seg.block_m,
        BLOCK_N=EXPAND_BLOCK_N,
        BLOCK_R=min(EXPAND_MAX_BLOCK_R, _pow2_at_least_16(r)),
        DOT_FP32=_dot_fp32(out.dtype),
    )


def apply_blocks(
    x: torch.Tensor,
    out: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
) -> None:
    """MELoRA's native form (backends/base.py apply_blocks): out[t, block b] += w * B[s, b] @ A[s, b]
    @ x[t, block b] for t = rows[i], s = slots[i], w = weights[i]. A: [slots, n, r, d]; B: [slots,
    n, o, r]; out: this module's columns (a view of the fused output is fine)."""
    A, B, x = A.contiguous(), B.contiguous(), _rows_contiguous(x)
    if out.stride(-1) != 1:
        raise ValueError("the triton blocks kernel writes rows of out with unit column stride")
    _, n, r, d = A.shape
    o = B.shape[2]
    grid = (len(rows), n)
    kernels.blocks_kernel[grid](
        x,
        A,
        B,
        out,
        rows,
        slots,
        weights,
        d,
        o,
        r,
        n,
        x.stride(0),
        out.stride(0),
        R_PAD=triton.next_power_of_2(r),
        BLOCK_D=BLOCKS_BLOCK_D,
        BLOCK_O=BLOCKS_BLOCK_O,
    )
