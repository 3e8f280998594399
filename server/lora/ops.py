"""The batched heterogeneous LoRA math: out += sum_i w_i * B_i A_i x, each token with its own set.

Adapters sit in slot stacks per (layer, module group); modules that share an input (q/k/v,
gate/up) share one A stack, so one gather and one shrink serve the whole group:

    A: [slots, n * r, d_in]     rows j*r:(j+1)*r belong to module j of the group (PEFT lora_A layout)
    B[j]: [slots, r, d_out_j]   alpha/r already folded in

Two paths, chosen once per step in batch.py:
- dense: few distinct adapters in the step. One matmul of all T tokens against the U unique
  slots, then a weighted expand; per-token weights [T, U] are zero where a token doesn't use a slot.
- gathered: many distinct adapters. Decode tokens gather their own K slots (index_select, then
  bmm: BGMV); each prefill chunk is one segment against its sequence's K slots (SGMV).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.lora.batch import LoRABatchInfo


@dataclass
class GroupStack:
    A: torch.Tensor  # [slots, n * r, d_in]
    B: list[torch.Tensor]  # n x [slots, r, d_out_j]
    out_columns: list[tuple[int, int]]  # where module j's output sits in the fused projection

    @property
    def rank(self) -> int:
        return self.B[0].shape[1]


def apply_lora(x: torch.Tensor, out: torch.Tensor, stack: GroupStack, info: LoRABatchInfo) -> None:
    """x: [T, d_in]; out: [T, d_out_total], updated in place."""
    if info.unique_slots is not None:
        _segment(x, out, stack, info.unique_slots, info.token_weights, info.unique_range)
        return
    nd = info.num_decode
    if nd:
        _gathered(x[:nd], out[:nd], stack, info.seq_slots[:nd], info.seq_weights[:nd])
    for i, (offset, length) in enumerate(info.prefill_spans, start=nd):
        rows = slice(offset, offset + length)
        _segment(x[rows], out[rows], stack, info.seq_slots[i], info.seq_weights[i : i + 1])


def _segment(
    x: torch.Tensor, out: torch.Tensor, stack: GroupStack, slots: torch.Tensor, weights: torch.Tensor | None,
    slot_range: tuple[int, int] | None = None,
) -> None:
    """All rows of x against one set of U slots. slots: [U]; weights: [T, U], [1, U] or None (all 1).
    slot_range: (s0, s1) when slots == arange(s0, s1), read as a view instead of a gathered copy."""
    T, U, r, n = x.shape[0], slots.shape[0], stack.rank, len(stack.B)

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t[slot_range[0] : slot_range[1]] if slot_range else t.index_select(0, slots)

    A = rows(stack.A).reshape(U * n * r, -1)  # [U*n*r, d_in]
    z = (x @ A.t()).view(T, U, n, r)  # shrink, [T, U, n, r]
    if weights is not None:  # None: every weight is 1
        z = z * weights.view(-1, U, 1, 1)
    for j, (c0, c1) in enumerate(stack.out_columns):
        B = rows(stack.B[j]).reshape(U * r, c1 - c0)  # [U*r, d_out_j]
        # With one slot, module j's z is a strided view [T, r]: BLAS reads it without a copy.
        zj = z[:, 0, j] if U == 1 else z[:, :, j].reshape(T, U * r)
        out[:, c0:c1].addmm_(zj, B)


def _gathered(
    x: torch.Tensor, out: torch.Tensor, stack: GroupStack, slots: torch.Tensor, weights: torch.Tensor
) -> None:
    """One token per row, each with its own K slots. slots, weights: [N, K]."""
    N, K = slots.shape
    r, n = stack.rank, len(stack.B)
    flat = slots.reshape(-1)  # [N*K]
    # [N*K, n*r, d_in] -> [N, K*n*r, d_in]: a row's K adapters stacked along the rank axis.
    A = stack.A.index_select(0, flat).view(N, K * n * r, -1)
    z = torch.bmm(x.unsqueeze(1), A.transpose(1, 2))  # [N, 1, K*n*r]
    z = z.view(N, K, n, r) * weights.view(N, K, 1, 1)
    for j, (c0, c1) in enumerate(stack.out_columns):
        B = stack.B[j].index_select(0, flat).view(N, K * r, c1 - c0)  # [N, K*r, d_out_j]
        # The bmm over K*r sums the K weighted adapters in one go.
        out[:, c0:c1] += torch.bmm(z[:, :, j].reshape(N, 1, K * r), B).squeeze(1)
