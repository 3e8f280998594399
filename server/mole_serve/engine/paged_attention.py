"""Decode attention straight from the paged KV pool on CUDA, in Triton: no gather, no allocation.

One program per (decoding sequence, kv head): the group's G = H / kvH query heads are the rows of
one [BLOCK_H, D] tile (padded to tl.dot's 16 rows), so each K/V tile is loaded once for the whole
group (GQA without repeating K/V). The program walks the sequence's positions BLOCK_N at a time,
each position's slot read through its block table, and keeps an online softmax in fp32 (a single
pass of flash-decoding, no split over the sequence). The grid comes from the shapes and the loop
bound from seq_lens on the device, so a CUDA graph can replay the launch over new tables and
lengths. A row with seq_len 0 (a graph bucket's padding) runs no tile and is written with zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the kernel's softmax runs in base 2 (exp2)
HEAD_DIMS = (16, 32, 64, 128, 256)  # one tile per head (arange needs a power of two; tl.dot, >= 16)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b accumulated in fp32; operands cast to fp32 first when DOT_FP32 (see INTERPRETED)."""
    if DOT_FP32:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    scale_log2,
    stride_qn,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_tn,
    stride_on,
    stride_oh,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """out[n, h] = softmax(q[n, h] . K[:len] * scale) @ V[:len] for the kv head h // GROUP of
    sequence n, position p at slot tables[n, p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE.
    q, out: [Nd, H, D]; k, v: [slots, kvH, D]; tables: int32 [Nd, max_blocks]; lens: int32 [Nd].
    scale_log2: the softmax scale times log2(e). Grid: (Nd, kvH)."""
    n, kvh = tl.program_id(0), tl.program_id(1)
    seq_len = tl.load(lens_ptr + n)
    rows = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + rows  # [BLOCK_H] the group's query heads, then padding rows
    head_mask = rows < GROUP
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + n * stride_qn + heads[:, None] * stride_qh + d[None, :], mask=head_mask[:, None], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of the base-2 scores
    denom = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    table = tables_ptr + n * stride_tn
    for start in range(0, seq_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        valid = pos < seq_len
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        # [BLOCK_N, D]; positions past the end are not read (their slots may hold anything)
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=valid[:, None], other=0.0)
        s = _dot(q, tl.trans(k), DOT_FP32) * scale_log2  # [BLOCK_H, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile holds a valid position
        alpha = tl.exp2(m - m_new)  # rescales what came before (0 on the first tile)
        p = tl.exp2(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)  # p rounded as the MMA takes it
        m = m_new
    o = acc / tl.where(denom > 0, denom, 1.0)[:, None]  # denom = 0 only when seq_len = 0: zeros
    dst = out_ptr + n * stride_on + heads[:, None] * stride_oh + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])


# Decorated under TRITON_INTERPRET=1 (tests on CPU tensors): bf16 is then cast to fp32 before
# tl.dot (the interpreter multiplies bf16's raw bits, triton#11584).
INTERPRETED = not isinstance(paged_decode_kernel, triton.runtime.JITFunction)


def block_h(group: int) -> int:
    """Query rows per program: the group's heads, padded to a power of two and to tl.dot's 16."""
    return max(16, triton.next_power_of_2(group))


def block_n(head_dim: int) -> int:
    """Positions per tile: fewer for the widest heads, whose K and V tiles fill the registers."""
    return 64 if head_dim <= 128 else 32


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Writes out [Nd, H, D] = each decoding sequence's attention over its first seq_lens[n]
    positions. q: [Nd, H, D]; k_pool, v_pool: a layer's [num_blocks * block_size, kvH, D];
    block_tables: int32 [Nd, max_blocks] (a sequence's blocks in position order, padded);
    seq_lens: int32 [Nd] (0: a padding row, written with zeros). Reads only shapes on the host."""
    nd, H, D = q.shape
    kv_heads = k_pool.shape[1]
    if D not in HEAD_DIMS:
        raise ValueError(f"paged decode attention needs a head_dim in {HEAD_DIMS}, got {D}")
    if H % kv_heads or k_pool.shape != v_pool.shape or k_pool.shape[2] != D or out.shape != q.shape:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, pool {tuple(k_pool.shape)}, out {tuple(out.shape)}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32")
    if any(t.stride(-1) != 1 for t in (q, k_pool, v_pool, out)):
        raise ValueError("q, the pools and out need a contiguous head_dim")
    group = H // kv_heads
    paged_decode_kernel[(nd, kv_heads)](
        q,
        k_pool,
        v_pool,
        block_tables,
        seq_lens,
        out,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        v_pool.stride(0),
        v_pool.stride(1),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        BLOCK_SIZE=block_size,
        BLOCK_H=block_h(group),
        BLOCK_N=block_n(D),
        HEAD_DIM=D,
        DOT_FP32=INTERPRETED and q.dtype == torch.bfloat16,
        num_warps=4,
        num_stages=2,
    )
