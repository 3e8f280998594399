"""The torch backend: the op of backends/base.py as a few large torch operations (the CPU path,
and the CUDA path until a kernel backend is chosen).

Two paths, chosen once per step in batch.py; both keep the shrink z unweighted until the weights
are known, so a gate can score candidates from z in rank space (gate.py) before the expand:
- dense: few distinct adapters in the step. One matmul of all T tokens against the U unique
  slots, then a weighted expand; token weights [T, U] are zero where a token doesn't use a slot.
- gathered: many distinct adapters. Decode tokens gather their own K slots (index_select, then
  bmm: BGMV); each prefill chunk is one segment against its sequence's K slots (SGMV). The
  decode gather is a copy of every adapter the tokens use, the larger part of the LoRA time on
  CPU, and a decode batch keeps the same adapters for many steps: GatherCache keeps it.

Ranks (backends/base.py): the dense path runs at the largest rank of its U slots; on the gathered
path each prefill chunk runs at its set's rank, and the decode rows in runs of one rank
(batch.decode_runs; the runner orders decode rows by rank), each run one gather and one bmm at its
rank. Per row would be finer, but a bmm needs one rank: grouping keeps it one bmm per rank present.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mole_serve.lora.backends.base import LoRABackend, expand, shrink
from mole_serve.lora.batch import LoRABatchInfo
from mole_serve.lora.stacks import GroupStack

if TYPE_CHECKING:
    from mole_serve.lora.gate import GateStats, LayerGate

Gathered = tuple[torch.Tensor, list[torch.Tensor]]  # A [N, K*n*r, d_in], n x B [N, K*r, d_out_j]


def gather(stack: GroupStack, slots: torch.Tensor, rank: int) -> Gathered:
    """Each row's K slots [N, K] copied out of the stack at `rank` (only those rows are read), a
    row's adapters stacked along the rank axis so that one bmm applies (shrink) or sums (expand) all K."""
    N, K = slots.shape
    A = stack.rows(stack.A, slots, None, rank)  # [N*K, n*rank, d_in]
    return A.view(N, K * A.shape[1], -1), [stack.rows(B, slots, None, rank).view(N, K * rank, -1) for B in stack.B]


class GatherCache:
    """The decode rows' gathered adapters of every (layer, group), kept while the decode batch's
    slot matrix, its rank runs and the slots' weights stay the same: a steady batch gathers once,
    not every step. Past `budget_bytes` nothing is kept (gathered per step)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._key: tuple | None = None
        self._gathered: dict[tuple[int, int], Gathered] = {}  # (id(stack), first row of a run) -> its adapters
        self.reused_steps = 0  # steps that gathered nothing

    def clear(self) -> None:
        self._key = None
        self._gathered.clear()

    def use(
        self,
        decode_slots: tuple[tuple[int, ...], ...],
        runs: tuple[tuple[int, int], ...],
        stacks_version: int,
        slot_bytes: int,
    ) -> bool:
        """Start a step whose decode rows have these (padded) slots in these rank runs; False:
        nothing is kept. slot_bytes: one slot's gathered size (at the step's rank)."""
        if not self.budget_bytes or sum(map(len, decode_slots)) * slot_bytes > self.budget_bytes:
            self.clear()
            return False
        key = (stacks_version, decode_slots, runs)
        if key == self._key:
            self.reused_steps += 1
        else:
            self.clear()
            self._key = key
        return True

    def get(self, stack: GroupStack, slots: torch.Tensor, rank: int, row0: int) -> Gathered:
        """The run of decode rows from row0 on, with these slots, at `rank`."""
        hit = self._gathered.get((id(stack), row0))
        if hit is None:
            hit = self._gathered[(id(stack), row0)] = gather(stack, slots, rank)
        return hit


class TorchBackend(LoRABackend):
    name = "torch"

    def __init__(self, cache_bytes: int = 0) -> None:
        self.gather_cache = GatherCache(cache_bytes)
        self._cached = False  # whether this step's decode rows read the gather cache

    def prepare(self, batch: LoRABatchInfo, stacks_version: int, slot_bytes: int) -> None:
        slots = batch.decode_slots
        self._cached = (
            slots is not None
            and bool(slots)
            and self.gather_cache.use(slots, batch.decode_runs, stacks_version, slot_bytes)
        )

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
        """x: [T, d_in]; out: [T, d_out_total], updated in place. weights: the tokens' weights over
        the path's columns (batch.token_weights, or what the layer's gate made of them)."""
        if batch.unique_slots is not None:
            rank = min(batch.rank, stack.rank)
            z = shrink(x, stack, batch.unique_slots, batch.unique_range, rank)  # [T, U, n*rank]
            if gate is not None:
                weights = gate.weigh(x, z, batch.unique_slots, weights, stats, slice(None))
            expand(z, weights, out, stack, batch.unique_slots, batch.unique_range)
            return weights
        parts = []  # the gated weights of each row block, in row order (no in-place: autograd)
        nd, ns = batch.num_decode, batch.num_decode_with_sets
        assert weights is not None  # rows on their own slots always carry token weights (build_lora_batch)
        row0 = 0
        for end, rank in batch.decode_runs:
            rows, rank = slice(row0, end), min(rank, stack.rank)
            slots = batch.lora_slots[rows]  # [R, K]
            A, Bs = self.gather_cache.get(stack, slots, rank, row0) if self._cached else gather(stack, slots, rank)
            z = torch.bmm(x[rows].unsqueeze(1), A.transpose(1, 2)).view(*slots.shape, -1)  # [R, K, n*rank]
            w = weights[rows] if gate is None else gate.weigh(x[rows], z, slots, weights[rows], stats, rows)
            parts.append(w)
            _expand_gathered(z, w, out[rows], stack, Bs)
            row0 = end
        parts.append(weights[ns:nd])  # rows with no adapter: their zero priors
        for i, (offset, length) in enumerate(batch.prefill_spans, start=nd):
            rows, rank = slice(offset, offset + length), min(max(batch.set_ranks[i]), stack.rank)
            if not rank:  # no adapter: nothing to add, and no candidate for a gate
                parts.append(weights[rows])
                continue
            slots = batch.lora_slots[i]  # [K]
            z = shrink(x[rows], stack, slots, None, rank)  # [L, K, n*rank]
            w = weights[rows] if gate is None else gate.weigh(x[rows], z, slots, weights[rows], stats, rows)
            parts.append(w)
            expand(z, w, out[rows], stack, slots, None)
        return weights if gate is None else torch.cat(parts)


def _expand_gathered(
    z: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, stack: GroupStack, Bs: list[torch.Tensor]
) -> None:
    """z: [N, K, n*r]; weights: [N, K]; Bs: the rows' gathered B of each module, at z's rank r."""
    N, K = weights.shape
    n = len(stack.B)
    r = z.shape[2] // n
    z = z.view(N, K, n, r) * weights.view(N, K, 1, 1)
    for j, (c0, c1) in enumerate(stack.out_columns):
        # The bmm over K*r sums the K weighted adapters in one go.
        out[:, c0:c1] += torch.bmm(z[:, :, j].reshape(N, 1, K * r), Bs[j]).squeeze(1)
