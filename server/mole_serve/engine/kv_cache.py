"""KV storage as a pool of fixed-size blocks (PagedAttention's layout), and attention over it.

Which blocks a sequence owns is the block manager's business (pure Python); this module holds
the tensors. Per layer, k and v are [num_blocks * block_size, kv_heads, head_dim]: position p of
a sequence lives at slot block_table[p // block_size] * block_size + p % block_size, so writing
a step's tokens is one index_copy_. On CUDA, decode attention reads the pool in place through the
block tables (engine/paged_attention.py's Triton kernel: no gather, no allocation). On CPU, and
as its reference, a decode batch gathers its sequences' slots in one index_select; the gathered
[N, L, kv_heads, head_dim] goes to SDPA as a strided view, which the CPU kernel reads in place
(cheaper than copying it to [N, kv_heads, L, head_dim] first; the measurements are in
docs/decisions.md). A prefill chunk that starts at position 0 attends to its own keys without
reading the pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    start: int  # position of the chunk's first token in its sequence
    length: int
    slots: torch.Tensor | None  # [start + length] slots of positions 0..; None at start 0 (own keys only)
    mask: torch.Tensor  # [G * length, start + length] bool, True = attend


@dataclass
class AttentionMetadata:
    """Where a step's tokens go in the pool and what each attends to. Tokens are laid out as
    [decode tokens (one per sequence) | prefill chunk 0 | prefill chunk 1 | ...]."""

    slot_mapping: torch.Tensor  # [T] pool slot of each token
    positions: torch.Tensor  # [T] position of each token in its sequence
    num_decode: int
    decode_slots: torch.Tensor  # [Nd, Lmax] slots of each decoding sequence's positions (padded with slot 0)
    decode_mask: torch.Tensor | None  # [Nd, 1, 1, Lmax] bool, True = attend; None when no padding
    decode_block_tables: torch.Tensor  # [Nd, max_blocks] int32 each decoding sequence's blocks (padded with 0)
    decode_seq_lens: torch.Tensor  # [Nd] int32 positions each decoding sequence attends to (its past and itself)
    prefill: list[PrefillChunk]


def block_table_tensor(block_tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """[N, max_blocks] int32: the tables padded with block 0."""
    width = max(map(len, block_tables), default=0)
    rows = [t + [0] * (width - len(t)) for t in block_tables]
    return torch.tensor(rows, dtype=torch.int32, device=device).view(len(rows), width)


def block_slots(tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, max_blocks * block_size] int64: the slots of each table's positions ([N, max_blocks])."""
    offsets = torch.arange(block_size, device=tables.device)
    return (tables[:, :, None].long() * block_size + offsets).flatten(1)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Unwritten slots are read under a mask (padding) and must hold finite values (softmax weight
    0 times NaN is NaN), so the pool starts zeroed. On CPU, numpy's calloc gives zero pages that
    are committed only when blocks are first written."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def _decode_kernel(device: torch.device, head_dim: int) -> Callable[..., None] | None:
    """The paged decode kernel on CUDA when triton imports and it takes this head_dim; None: gather + SDPA."""
    if device.type != "cuda":
        return None
    try:
        from mole_serve.engine.paged_attention import HEAD_DIMS, paged_decode_attention
    except ImportError:  # a torch build without triton
        return None
    return paged_decode_attention if head_dim in HEAD_DIMS else None


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.block_bytes = self.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.k = [_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.v = [_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.decode_kernel = _decode_kernel(device, head_dim)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        # k, v: [T, kv_heads, head_dim]
        self.k[layer].index_copy_(0, meta.slot_mapping, k)
        self.v[layer].index_copy_(0, meta.slot_mapping, v)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, heads, head_dim]; k, v: the step's own [T, kv_heads, head_dim] (already written)
        -> [T, heads * head_dim]."""
        T, H, D = q.shape
        kv_heads = k.shape[1]
        group = H // kv_heads  # query heads sharing one kv head (GQA)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            self._attend_decode(layer, q[:nd], meta, kv_heads, group, out[:nd])
        offset = nd
        for chunk in meta.prefill:
            c = chunk.length
            qc = q[offset : offset + c]  # [c, H, D]
            # The G query heads of a kv group become G*c query rows: no repeat of K/V.
            qg = qc.view(c, kv_heads, group, D).permute(1, 2, 0, 3).reshape(1, kv_heads, group * c, D)
            if chunk.slots is None:  # [1, kvH, c, D] straight from this step
                kc, vc = (t[offset : offset + c].transpose(0, 1)[None] for t in (k, v))
            else:  # earlier positions from the pool (an earlier chunk, or the prefix cache)
                kc, vc = (t[layer].index_select(0, chunk.slots).transpose(0, 1)[None] for t in (self.k, self.v))
            o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=chunk.mask)  # [1, kvH, G*c, D]
            out[offset : offset + c] = o.view(kv_heads, group, c, D).permute(2, 0, 1, 3).reshape(c, H, D)
            offset += c
        return out.view(T, H * D)

    def _attend_decode(
        self, layer: int, q: torch.Tensor, meta: AttentionMetadata, kv_heads: int, group: int, out: torch.Tensor
    ) -> None:
        """q, out: [Nd, H, D]; out written in place."""
        nd, _, D = q.shape
        if self.decode_kernel is not None:
            k_pool, v_pool = self.k[layer], self.v[layer]
            tables, lens = meta.decode_block_tables, meta.decode_seq_lens
            self.decode_kernel(q, k_pool, v_pool, tables, lens, self.block_size, D**-0.5, out)  # SDPA's scale
            return
        L = meta.decode_slots.shape[1]
        flat = meta.decode_slots.view(-1)
        # [Nd, kvH, L, D] as a strided view of the gathered [Nd, L, kvH, D]
        k = self.k[layer].index_select(0, flat).view(nd, L, kv_heads, D).transpose(1, 2)
        v = self.v[layer].index_select(0, flat).view(nd, L, kv_heads, D).transpose(1, 2)
        qg = q.view(nd, kv_heads, group, D)  # the group's heads act as G query rows
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=meta.decode_mask)  # [Nd, kvH, G, D]
        out.copy_(o.reshape(nd, kv_heads * group, D))
