"""KV storage: one slot (a row of max_model_len positions) per running sequence, per layer.

Slot allocation lives in the scheduler (pure Python); this module holds the tensors and the
attention over them. Layout per layer: k, v: [slots, kv_heads, max_len, head_dim], so one
sequence's keys are contiguous and a decode batch on slots s0..s0+B-1 is a view, not a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where a step's tokens go in the cache and what each attends to. Tokens are laid out as
    [decode tokens (one per sequence) | prefill chunk 0 | prefill chunk 1 | ...]."""

    write_kv_slots: torch.Tensor  # [T] KV slot of each token
    write_positions: torch.Tensor  # [T] position of each token
    num_decode: int
    decode_kv_slots: torch.Tensor  # [Nd]
    decode_kv_range: tuple[int, int] | None  # (s0, s1) when decode_kv_slots == arange(s0, s1)
    decode_max_len: int
    decode_mask: torch.Tensor | None  # [Nd, 1, 1, Lmax] bool, True = attend
    # One entry per prefill chunk: (kv slot, first position, chunk length, mask [G*c, start+c])
    prefill: list[tuple[int, int, int, torch.Tensor]]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Masked cache positions must hold finite values (softmax weight 0 times NaN is NaN), so the
    cache starts zeroed. On CPU, numpy's calloc gives zero pages that are committed only as slots
    fill, so a large max_model_len costs memory only when used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.k = [_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.v = [_zeros(shape, dtype, device) for _ in range(num_layers)]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        # k, v: [T, kv_heads, head_dim]
        self.k[layer][meta.write_kv_slots, :, meta.write_positions] = k
        self.v[layer][meta.write_kv_slots, :, meta.write_positions] = v

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads, head_dim] -> [T, heads * head_dim]."""
        T, H, D = q.shape
        kv_heads = self.k[layer].shape[1]
        group = H // kv_heads  # query heads sharing one kv head (GQA)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            out[:nd] = self._attend_decode(layer, q[:nd], meta, kv_heads, group)
        offset = nd
        for slot, start, length, mask in meta.prefill:
            qc = q[offset : offset + length]  # [c, H, D]
            # The G query heads of a kv group become G*c query rows: no repeat of K/V.
            qg = qc.view(length, kv_heads, group, D).permute(1, 2, 0, 3).reshape(1, kv_heads, group * length, D)
            k = self.k[layer][slot : slot + 1, :, : start + length]
            v = self.v[layer][slot : slot + 1, :, : start + length]
            o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)  # [1, kvH, G*c, D]
            out[offset : offset + length] = o.view(kv_heads, group, length, D).permute(2, 0, 1, 3).reshape(length, H, D)
            offset += length
        return out.view(T, H * D)

    def _attend_decode(
        self, layer: int, q: torch.Tensor, meta: AttentionMetadata, kv_heads: int, group: int
    ) -> torch.Tensor:
        nd, _, D = q.shape
        L = meta.decode_max_len
        if meta.decode_kv_range is not None:
            s0, s1 = meta.decode_kv_range
            k = self.k[layer][s0:s1, :, :L]
            v = self.v[layer][s0:s1, :, :L]
        else:
            k = self.k[layer][:, :, :L].index_select(0, meta.decode_kv_slots)
            v = self.v[layer][:, :, :L].index_select(0, meta.decode_kv_slots)
        qg = q.view(nd, kv_heads, group, D)  # the group's heads act as G query rows
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=meta.decode_mask)  # [Nd, kvH, G, D]
        return o.reshape(nd, kv_heads * group, D)
