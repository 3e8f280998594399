"""The Triton kernels of the batched LoRA op (the layout and its reasons: this package's docstring).

Every kernel reads its rows through a tile table, int32 [num_tiles, 3] = (first row, end of the
tile's segment, segment), and the segment's slots from seg_slots: int32 [num_segments, C]. Rows
of one tile share their C slots, so A and B tiles are loaded once per tile and multiplied with
tl.dot. Each column's rank comes from seg_ranks (int32 [num_segments, C], beside seg_slots): the
slot's own rank, so only that many rank rows of each module block are read (the rest are zero in
the stacks), and a column of rank 0 (the all-zero slot) is skipped, not multiplied. z is laid out
at the op's rank R (the largest of its columns': [T, C, n*R], module j at j*R), the stacks at
their own r >= R (module j's A rows at j*r).

Portability rules these kernels keep (docs/decisions.md, "The Triton layout"): masks combine with
`&`, never Python `and` (the interpreter evaluates `and` as plain Python: silently wrong); bf16
operands are cast to fp32 before tl.dot when DOT_FP32 is set (the interpreter multiplies bf16's raw
bits); reductions run on fp32 values; no autotune (it needs a GPU even to interpret).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def shrink_kernel(
    x_ptr,
    a_ptr,
    z_ptr,
    tiles_ptr,
    seg_slots_ptr,
    seg_ranks_ptr,
    d_in,
    rank,
    r_stack,
    nr,
    num_cols,
    stride_xt,
    stride_as,
    stride_ar,
    stride_zt,
    stride_zc,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """z[t, c, j*R + k] = A[slot(t, c)][j*r + k] @ x[t] in fp32, unweighted (the gate may read it
    before the expand), for k below the column's rank, 0 from there to R. x: [T, d_in]; A: [slots,
    n*r, d_in]; z: [T, C, nr = n*R] fp32; rank: R; r_stack: r. Grid: (tiles, C, cdiv(nr, BLOCK_N))."""
    tile, c, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row0 = tl.load(tiles_ptr + tile * 3)
    row_end = tl.load(tiles_ptr + tile * 3 + 1)
    seg = tl.load(tiles_ptr + tile * 3 + 2)
    slot = tl.load(seg_slots_ptr + seg * num_cols + c).to(tl.int64)
    col_rank = tl.minimum(tl.load(seg_ranks_ptr + seg * num_cols + c), rank)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < nr
    k_of_col = cols % rank
    a_rows = (cols // rank) * r_stack + k_of_col  # module j's row k in the stack
    a_mask = col_mask & (k_of_col < col_rank)  # past the column's rank A is zero: not read
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if tl.max(a_mask.to(tl.int32), axis=0) > 0:  # some column of this block within the slot's rank
        a_base = a_ptr + slot * stride_as
        for k0 in range(0, d_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < d_in
            xt = tl.load(
                x_ptr + rows[:, None].to(tl.int64) * stride_xt + ks[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_K]
            at = tl.load(
                a_base + a_rows[None, :] * stride_ar + ks[:, None], mask=k_mask[:, None] & a_mask[None, :], other=0.0
            )  # [BLOCK_K, BLOCK_N]
            if DOT_FP32:
                xt = xt.to(tl.float32)
                at = at.to(tl.float32)
            acc += tl.dot(xt, at, input_precision="ieee")
    z = z_ptr + rows[:, None].to(tl.int64) * stride_zt + c * stride_zc + cols[None, :]
    tl.store(z, acc, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def expand_kernel(
    z_ptr,
    w_ptr,
    out_ptr,
    b_table_ptr,
    b_meta_ptr,
    tiles_ptr,
    seg_slots_ptr,
    seg_ranks_ptr,
    rank,
    r_stack,
    num_cols,
    stride_zt,
    stride_zc,
    stride_wt,
    stride_wj,
    stride_wc,
    stride_ot,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """out[t, c0_j + n] += sum_c w[t, j, c] * z[t, c, j*R : j*R + r_c] @ B_j[slot(t, c)][:r_c, n],
    r_c the column's rank, summed over the C columns in fp32 registers, one read-add-write of out
    per tile (no atomics). z: [T, C, n*R] fp32 (rank: R); w: strides (t, j, c), j's stride 0 when
    weights are per (token, column); out: [T, sum d_out_j] in the storage dtype; B_j: [slots, r,
    d_out_j] contiguous (r_stack: r), its address in b_table (int64 [n]) and (d_out_j, c0_j) in
    b_meta (int32 [n, 2]). Grid: (tiles, cdiv(max d_out_j, BLOCK_N), n)."""
    tile, nb, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d_out = tl.load(b_meta_ptr + j * 2)
    c0 = tl.load(b_meta_ptr + j * 2 + 1)
    if nb * BLOCK_N >= d_out:  # module j is narrower than the widest of the group
        return
    b_ptr = tl.load(b_table_ptr + j).to(tl.pointer_type(out_ptr.dtype.element_ty))
    row0 = tl.load(tiles_ptr + tile * 3)
    row_end = tl.load(tiles_ptr + tile * 3 + 1)
    seg = tl.load(tiles_ptr + tile * 3 + 2)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < d_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(num_cols):
        slot = tl.load(seg_slots_ptr + seg * num_cols + c).to(tl.int64)
        col_rank = tl.minimum(tl.load(seg_ranks_ptr + seg * num_cols + c), rank)
        if col_rank > 0:
            if HAS_WEIGHTS:
                w = tl.load(w_ptr + rows64 * stride_wt + j * stride_wj + c * stride_wc, mask=row_mask, other=0.0)
                w = w.to(tl.float32)
            for k0 in range(0, col_rank, BLOCK_R):  # the column's rank in chunks: bounded registers
                ks = k0 + tl.arange(0, BLOCK_R)
                k_mask = ks < col_rank
                zt = tl.load(
                    z_ptr + rows64[:, None] * stride_zt + c * stride_zc + j * rank + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )  # [BLOCK_M, BLOCK_R] fp32
                if HAS_WEIGHTS:
                    zt = zt * w[:, None]
                bt = tl.load(
                    b_ptr + slot * r_stack * d_out + ks[:, None] * d_out + cols[None, :],
                    mask=k_mask[:, None] & col_mask[None, :],
                    other=0.0,
                )  # [BLOCK_R, BLOCK_N]
                if DOT_FP32:
                    acc += tl.dot(zt, bt.to(tl.float32), input_precision="ieee")
                else:  # tensor cores in the storage dtype, fp32 accumulation
                    acc += tl.dot(zt.to(bt.dtype), bt, input_precision="ieee")
    o = out_ptr + rows64[:, None] * stride_ot + c0 + cols[None, :]
    o_mask = row_mask[:, None] & col_mask[None, :]
    prev = tl.load(o, mask=o_mask, other=0.0)
    tl.store(o, (prev.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def blocks_kernel(
    x_ptr,
    a_ptr,
    b_ptr,
    out_ptr,
    rows_ptr,
    slots_ptr,
    w_ptr,
    d,
    o,
    rank,
    n_blocks,
    stride_xt,
    stride_ot,
    R_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """MELoRA's native block form, shrink and expand fused (a block's rank is tiny: the z of one
    token and block is a few registers). For row t = rows[i], slot s = slots[i], block b:
        out[t, b*o:(b+1)*o] += w[i] * B[s, b] @ (A[s, b] @ x[t, b*d:(b+1)*d])
    A: [slots, n, r, d]; B: [slots, n, o, r], both contiguous. Each token has its own slot, so
    this is a per-token (BGMV) kernel: products and sums, no tl.dot (r is below its minimum); z is
    computed once per (token, block) and the block's o outputs are swept in BLOCK_O steps.
    Grid: (len(rows), n_blocks)."""
    i, blk = tl.program_id(0), tl.program_id(1)
    t = tl.load(rows_ptr + i).to(tl.int64)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    rs = tl.arange(0, R_PAD)
    r_mask = rs < rank
    a_base = a_ptr + (slot * n_blocks + blk) * rank * d
    z = tl.zeros((R_PAD,), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_mask = ks < d
        xv = tl.load(x_ptr + t * stride_xt + blk * d + ks, mask=k_mask, other=0.0).to(tl.float32)
        at = tl.load(a_base + rs[:, None] * d + ks[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(
            tl.float32
        )  # [R_PAD, BLOCK_D]
        z += tl.sum(at * xv[None, :], axis=1)
    z = z * tl.load(w_ptr + i).to(tl.float32)
    b_base = b_ptr + (slot * n_blocks + blk) * o * rank
    for o0 in range(0, o, BLOCK_O):
        cols = o0 + tl.arange(0, BLOCK_O)
        c_mask = cols < o
        bt = tl.load(b_base + cols[:, None] * rank + rs[None, :], mask=c_mask[:, None] & r_mask[None, :], other=0.0).to(
            tl.float32
        )  # [BLOCK_O, R_PAD]
        dst = out_ptr + t * stride_ot + blk * o + cols
        prev = tl.load(dst, mask=c_mask, other=0.0)
        tl.store(dst, (prev.to(tl.float32) + tl.sum(bt * z[None, :], axis=1)).to(out_ptr.dtype.element_ty), mask=c_mask)
