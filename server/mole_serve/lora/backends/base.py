"""What a LoRA backend computes, stated as a plain loop (the tests' oracle for every backend).

For one adapted module group of one layer, with x: [T, d_in] and the group's fused base output
out: [T, d_out_total], a backend adds in place, for every token t of sequence i(t):

    for c, slot in enumerate(batch's columns of t):         # K slots (gathered) or U unique (dense)
        z[t, c] = stack.A[slot] @ x[t]                        # shrink, [n*r]
    w[t] = weights[t]                                         # [C] prior weights (None: all 1)
           or, at the probe group with a gate, gate.weigh(x, z, ...) for the gated tokens
    for j, (c0, c1) in enumerate(stack.out_columns):          # module j of the group
        out[t, c0:c1] += sum_c w[t, c] * z[t, c, j*r:(j+1)*r] @ stack.B[j][slot]

and returns the weights it used, which the layer's other groups then apply (one gate decision
per layer, MoLE's hierarchical control). z stays unweighted until the weights are known, so the
gate scores candidates in rank space before the expand. Slot 0 is all zeros: padding costs
nothing but FLOPs.

Every slot is padded to the stacks' rank r, and the rows past an adapter's own rank are zero: an op
over some slots computes exactly the same at any rank from the largest of theirs up to r, so each
runs at that rank (the batch's ranks, batch.py), reading only the first rows of each module block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mole_serve.lora.batch import BlockRows, LoRABatchInfo, take_rows
from mole_serve.lora.stacks import GroupStack

if TYPE_CHECKING:
    from mole_serve.lora.gate import GateStats, LayerGate


class LoRABackend:
    """The contract. A backend may keep state across steps (caches); `prepare` is called once per
    step before any layer runs."""

    name = "base"

    def __init__(self, cache_bytes: int = 0) -> None:
        """cache_bytes: memory the backend may keep across steps (0: none)."""

    def prepare(self, batch: LoRABatchInfo, stacks_version: int, slot_bytes: int) -> None:
        """A new step. stacks_version changes whenever any slot's weights change (caches keyed
        on slot numbers must then be dropped); slot_bytes is one slot's size over every layer."""

    def apply(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        stack: GroupStack,
        batch: LoRABatchInfo,
        weights: torch.Tensor | None,
        gate: LayerGate | None = None,
        stats: GateStats | None = None,
    ) -> torch.Tensor | None:
        raise NotImplementedError

    def apply_blocks(
        self, x: torch.Tensor, out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, rows: BlockRows
    ) -> None:
        """The native block form (MELoRA) of one module for its rows t, with s = rows.slots[t]:

            out[t, i*o:(i+1)*o] += w[t] * B[s, i] @ A[s, i] @ x[t, i*d:(i+1)*d]    for each block i

        x: [T, d_in]; out: [T, d_out] (this module's columns, updated in place); A: [slots, n, r,
        d = d_in/n]; B: [slots, n, o = d_out/n, r]. Equal to the dense blockdiag update, 1/n the bytes."""
        Tb, n = len(rows.rows), A.shape[1]
        xs = take_rows(x, rows.rows, rows.row_range).view(Tb, n, 1, -1)  # [Tb, n, 1, d]
        # Each token has its own blocks: elementwise products and sums, not Tb*n tiny GEMMs (faster at
        # LoRA ranks on CPU; docs/decisions.md)
        z = (xs * A.index_select(0, rows.slots)).sum(-1) * rows.weights.view(Tb, 1, 1)  # [Tb, n, r]
        delta = (B.index_select(0, rows.slots) * z.unsqueeze(2)).sum(-1).view(Tb, -1)  # [Tb, d_out]
        if rows.row_range:
            take_rows(out, rows.rows, rows.row_range).add_(delta)
        else:
            out.index_add_(0, rows.rows, delta)

    # --- mixtures of LoRA experts (MixLoRA, MoELoRA): one adapter's E expert slots, rows of its own ---
    def apply_experts(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        stack: GroupStack,
        slots: torch.Tensor,
        slot_range: tuple[int, int] | None,
        rank: int,
        weights: torch.Tensor | None,
    ) -> None:
        """out[t, cols_j] += sum_e w[t, j, e] * B_j[s_e] @ A_j[s_e] @ x[t] over the E slots s_e, for
        module j of the group. x: [T, d_in]; rank: the largest of the slots'; weights: [T, n, E] (a
        router's top-k, zero elsewhere: the unselected experts cost FLOPs, not a gather), or None
        (all 1: a shared LoRA)."""
        expand(shrink(x, stack, slots, slot_range, rank), weights, out, stack, slots, slot_range)

    def selected_expert_outputs(
        self,
        x: torch.Tensor,
        stack: GroupStack,
        slots: torch.Tensor,
        slot_range: tuple[int, int] | None,
        rank: int,
        experts: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Each token's k selected experts' own outputs, unweighted, per module j of the group:
        [T, k, d_out_j] (MixLoRA's gate/up, which the activation then mixes per expert). experts:
        [T, k]. Every expert's shrink, then per k the one-hot rank block of its expert: one expand
        GEMM per module, no gather of B."""
        T, k = experts.shape
        E, r, n = len(slots), rank, len(stack.B)
        z = shrink(x, stack, slots, slot_range, r).view(T, 1, E, n, r)
        pick = torch.zeros(T, k, E, 1, 1, dtype=z.dtype, device=z.device).scatter_(2, experts.view(T, k, 1, 1, 1), 1.0)
        z_k = (z * pick).view(T * k, E, n, r)  # [T*k, E, n, r]: zero but for the selected expert
        return [
            (z_k[:, :, j].reshape(T * k, E * r) @ stack.rows(B, slots, slot_range, r).reshape(E * r, -1)).view(T, k, -1)
            for j, B in enumerate(stack.B)
        ]

    def apply_routed_inputs(
        self,
        xk: torch.Tensor,
        out: torch.Tensor,
        stack: GroupStack,
        slots: torch.Tensor,
        slot_range: tuple[int, int] | None,
        rank: int,
        experts: torch.Tensor,
        weights: torch.Tensor,
    ) -> None:
        """out[t] += sum_k w[t, k] * B[s_e] @ A[s_e] @ xk[t, k] with e = experts[t, k]: each of a
        token's k experts on its own input (MixLoRA's down projection of each expert's activation).
        xk: [T, k, d_in]; experts, weights: [T, k]. One-module groups only."""
        T, k, _ = xk.shape
        E, r = len(slots), rank
        z = shrink(xk.reshape(T * k, -1), stack, slots, slot_range, r).view(T, k, E, r)  # every expert, then pick
        own = z.gather(2, experts.view(T, k, 1, 1).expand(T, k, 1, r)).squeeze(2) * weights.unsqueeze(-1)
        per_expert = z.new_zeros(T, E, r).scatter_add_(1, experts.unsqueeze(-1).expand(T, k, r), own)
        expand(per_expert, None, out, stack, slots, slot_range)


def shrink(
    x: torch.Tensor,
    stack: GroupStack,
    slots: torch.Tensor,
    slot_range: tuple[int, int] | None,
    rank: int | None = None,
) -> torch.Tensor:
    """All rows of x against one set of U slots at `rank` (None: the stack's): [T, U, n*rank], one
    GEMM. Cut below the stack's rank, A's rows are copied out first (stacks.GroupStack.rows): the
    copy reads only the rows the GEMM then reads, where the full view would make it read all r."""
    A = stack.rows(stack.A, slots, slot_range, stack.rank if rank is None else rank)  # [U, n*rank, d_in]
    U, nr, d_in = A.shape
    return (x @ A.reshape(U * nr, d_in).t()).view(x.shape[0], U, nr)


def expand(
    z: torch.Tensor,
    weights: torch.Tensor | None,
    out: torch.Tensor,
    stack: GroupStack,
    slots: torch.Tensor,
    slot_range: tuple[int, int] | None,
) -> None:
    """out += the U slots' B applied to z [T, U, n*r] (r: the rank shrink ran at), weighted: weights
    [T, U] or [1, U] (one per slot), [T, n, U] (one per module and slot), or None (all 1)."""
    T, U, n = z.shape[0], z.shape[1], len(stack.B)
    r = z.shape[2] // n
    z = z.view(T, U, n, r)
    if weights is not None:
        z = z * (weights.transpose(1, 2).unsqueeze(-1) if weights.dim() == 3 else weights.view(-1, U, 1, 1))
    for j, (c0, c1) in enumerate(stack.out_columns):
        B = stack.rows(stack.B[j], slots, slot_range, r).reshape(U * r, c1 - c0)  # [U*r, d_out_j]
        # With one slot, module j's z is a strided view [T, r]: BLAS reads it without a copy.
        zj = z[:, 0, j] if U == 1 else z[:, :, j].reshape(T, U * r)
        out[:, c0:c1].addmm_(zj, B)


def token_columns(batch: LoRABatchInfo) -> list[list[int]]:
    """Per token, the slots its weight columns stand for."""
    if batch.unique_slots is not None:
        return [batch.unique_slots.tolist()] * (batch.num_decode + sum(n for _, n in batch.prefill_spans))
    per_seq = batch.lora_slots.tolist()
    rows = per_seq[: batch.num_decode]
    for i, (_, n) in enumerate(batch.prefill_spans, start=batch.num_decode):
        rows += [per_seq[i]] * n
    return rows


class ReferenceBackend(LoRABackend):
    """The loop above, token by token (no gate: the gate's math is tested on its own). Slow; for tests."""

    name = "reference"

    def apply(self, x, out, stack, batch, weights, gate=None, stats=None):
        if gate is not None:
            raise NotImplementedError("the reference loop states the ungated op")
        r = stack.rank
        for t, slots in enumerate(token_columns(batch)):
            for c, slot in enumerate(slots):
                w = 1.0 if weights is None else weights[t, c]
                z = stack.A[slot] @ x[t]  # [n*r]
                for j, (c0, c1) in enumerate(stack.out_columns):
                    out[t, c0:c1] += w * z[j * r : (j + 1) * r] @ stack.B[j][slot]
        return weights
