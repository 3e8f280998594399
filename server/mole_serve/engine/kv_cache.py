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

Each layer may attend its own way (LayerAttention, from the model's family): a softmax scale other
than 1/sqrt(head_dim), a sliding window and a tanh soft cap on the logits. The paged kernel knows
only the scale, so on CUDA a layer with a window or a cap decodes on the gather + SDPA path too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LayerAttention:
    """How one layer attends, as transformers' attention for the family: softmax(cap(q.k * scale)),
    cap(s) = softcap * tanh(s / softcap) when softcap is set; with a window, a query at position p
    sees the keys at positions j with p - window < j <= p (transformers' sliding_window_overlay:
    kv_idx > q_idx - sliding_window), else every j <= p."""

    scale: float
    window: int | None = None
    softcap: float | None = None


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, spec: LayerAttention | None
) -> torch.Tensor:
    """q: [..., M, D]; k, v: [..., L, D]; mask: bool, True = attend, broadcast to [..., M, L]."""
    if spec is None or spec.softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale if spec else None)
    # SDPA has no soft cap: transformers' eager attention, step for step (scores capped before the
    # mask, softmax in float32).
    scores = torch.matmul(q, k.transpose(-1, -2)) * spec.scale  # [..., M, L]
    scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _window_mask(query_pos: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """[M, num_keys] bool: key position j (0..num_keys-1) not after each query position (query_pos:
    [M]) and, given a window, within it."""
    keys = torch.arange(num_keys, device=query_pos.device)[None, :]
    mask = keys <= query_pos[:, None]
    return mask if window is None else mask & (keys > query_pos[:, None] - window)


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
    # [T] per token, the length of its sequence as a forward over all its known tokens sees it (a
    # prompt's whole length, even for an early chunk): longrope picks its factors by it, as HF
    # picks them per forward call. None: each token's chunk end (position + 1 for a decode token).
    rope_lens: torch.Tensor | None = None


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
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        spec: LayerAttention | None = None,
    ) -> torch.Tensor:
        """q: [T, heads, head_dim]; k, v: the step's own [T, kv_heads, head_dim] (already written)
        -> [T, heads * head_dim]. spec: the layer's scale, window and cap (None: 1/sqrt(head_dim),
        causal over the whole past, no cap)."""
        T, H, D = q.shape
        kv_heads = k.shape[1]
        group = H // kv_heads  # query heads sharing one kv head (GQA)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            self._attend_decode(layer, q[:nd], meta, kv_heads, group, out[:nd], spec)
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
            mask = chunk.mask
            if spec is not None and spec.window is not None:
                # rows are the G heads' copies of the chunk's c queries, as chunk.mask lays them out
                query_pos = torch.arange(chunk.start, chunk.start + c, device=q.device)
                mask = mask & _window_mask(query_pos, mask.shape[1], spec.window).repeat(group, 1)
            o = _attention(qg, kc, vc, mask, spec)  # [1, kvH, G*c, D]
            out[offset : offset + c] = o.view(kv_heads, group, c, D).permute(2, 0, 1, 3).reshape(c, H, D)
            offset += c
        return out.view(T, H * D)

    def _attend_decode(
        self,
        layer: int,
        q: torch.Tensor,
        meta: AttentionMetadata,
        kv_heads: int,
        group: int,
        out: torch.Tensor,
        spec: LayerAttention | None = None,
    ) -> None:
        """q, out: [Nd, H, D]; out written in place."""
        nd, _, D = q.shape
        slots, mask, from_tables = meta.decode_slots, meta.decode_mask, False
        if self.decode_kernel is not None:
            if spec is None or (spec.window is None and spec.softcap is None):
                k_pool, v_pool = self.k[layer], self.v[layer]
                tables, lens = meta.decode_block_tables, meta.decode_seq_lens
                scale = D**-0.5 if spec is None else spec.scale  # D**-0.5: SDPA's default
                self.decode_kernel(q, k_pool, v_pool, tables, lens, self.block_size, scale, out)
                return
            # The kernel has no window or cap: gather through the block tables (the kernel's
            # callers need not fill decode_slots), masked from the lengths below.
            slots, from_tables = block_slots(meta.decode_block_tables, self.block_size), True
        L = slots.shape[1]
        flat = slots.reshape(-1)
        # [Nd, kvH, L, D] as a strided view of the gathered [Nd, L, kvH, D]
        k = self.k[layer].index_select(0, flat).view(nd, L, kv_heads, D).transpose(1, 2)
        v = self.v[layer].index_select(0, flat).view(nd, L, kv_heads, D).transpose(1, 2)
        qg = q.view(nd, kv_heads, group, D)  # the group's heads act as G query rows
        window = spec.window if spec is not None else None
        if window is not None or from_tables:  # keys past the query masked too
            # a padding row (length 0) reads position 0 rather than nothing (an all-masked row is NaN)
            query_pos = (meta.decode_seq_lens.long() - 1).clamp(min=0)
            mask = _window_mask(query_pos, L, window).view(nd, 1, 1, L)
        o = _attention(qg, k, v, mask, spec)  # [Nd, kvH, G, D]
        out.copy_(o.reshape(nd, kv_heads * group, D))
