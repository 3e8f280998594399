"""TritonBackend: the op of backends/base.py through the kernels of this package (CUDA; on CPU
tensors only under TRITON_INTERPRET=1, which the tests use)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mole_serve.lora.backends.base import LoRABackend
from mole_serve.lora.backends.torch_ref import TorchBackend
from mole_serve.lora.backends.triton import ops
from mole_serve.lora.batch import BlockRows, LoRABatchInfo
from mole_serve.lora.stacks import GroupStack

if TYPE_CHECKING:
    from mole_serve.lora.gate import GateStats, LayerGate

MAX_EXPERT_PLANS = 64  # segment plans of mixture-of-experts rows kept (keyed by row count, slots and rank)


def step_segments(batch: LoRABatchInfo) -> ops.Segments:
    """The step's rows as segments of shared slots, each column at its slot's own rank. Dense path:
    every token against the U unique slots, one segment. Gathered path: consecutive decode rows
    with the same K slots, then each prefill chunk against its sequence's K slots."""
    nd = batch.num_decode
    if batch.row_ranks is not None:  # a static decode step: each row its own segment of 16-row tiles
        rows = torch.arange(nd, dtype=torch.int32, device=batch.lora_slots.device)
        tiles = torch.stack([rows, rows + 1, rows], dim=1)  # [N, 3]: first row, end row, segment
        slot_table, ranks = batch.lora_slots.to(torch.int32).contiguous(), batch.row_ranks.contiguous()
        return ops.Segments(tiles, slot_table, ranks, 16, batch.rank)
    if batch.unique_slots is not None:
        assert batch.unique_ranks is not None  # set with unique_slots (build_lora_batch)
        total = nd + sum(n for _, n in batch.prefill_spans)
        return ops.plan([(0, total)], batch.unique_slots.view(1, -1), [batch.unique_ranks])
    # the decode rows up to the last with a set; the rows after have none and are no segment's
    decode = batch.decode_slots if batch.decode_slots is not None else tuple(map(tuple, batch.lora_slots[:nd].tolist()))
    spans: list[tuple[int, int]] = []
    seqs: list[int] = []  # the sequence whose slots each segment uses
    for i, slots in enumerate(decode):
        if i and decode[i - 1] == slots:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((i, 1))
            seqs.append(i)
    for i, span in enumerate(batch.prefill_spans, start=nd):
        spans.append(span)
        seqs.append(i)
    index = torch.tensor(seqs, dtype=torch.long).to(batch.lora_slots.device, non_blocking=True)
    return ops.plan(spans, batch.lora_slots.index_select(0, index), [batch.set_ranks[i] for i in seqs])


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """The kernels have no backward: a step that autograd records (train-gate) runs in torch."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class TritonBackend(LoRABackend):
    name = "triton"

    def __init__(self, cache_bytes: int = 0) -> None:
        """cache_bytes is the torch backend's gather cache; the kernels read the slots in place
        and keep nothing across steps, so it is accepted and unused."""
        if not ops.INTERPRETED and not torch.cuda.is_available():
            raise RuntimeError(
                "the triton LoRA backend needs a CUDA device (its kernels run on CPU tensors only "
                "under TRITON_INTERPRET=1, for tests); use MOLE_LORA_BACKEND=torch"
            )
        self.autograd = TorchBackend()
        self.tables = ops.BTables()
        self._batch: LoRABatchInfo | None = None
        self._segments: ops.Segments | None = None
        self._expert_plans: dict[tuple[int, int, int], ops.Segments] = {}

    def prepare(self, batch: LoRABatchInfo, stacks_version: int, slot_bytes: int) -> None:
        """One segment plan per step, shared by every layer and group."""
        self._batch, self._segments = batch, step_segments(batch)

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
        """As TorchBackend.apply: x [T, d_in]; out [T, d_out_total] updated in place; returns the
        weights used (the gate's, at the probe group)."""
        if _needs_autograd(x, out, weights, None if gate is None else gate.query):
            return self.autograd.apply(x, out, stack, batch, weights, gate, stats)
        if batch is not self._batch:
            self.prepare(batch, 0, 0)
        segments = self._segments
        assert segments is not None  # prepare() set it for this batch
        z = ops.shrink(x, stack, segments)  # [T, C, n*r] fp32
        if gate is not None:
            weights = self._weigh(gate, x, z.to(x.dtype), batch, weights, stats)
        ops.expand(z, weights, out, stack, segments, self.tables)
        return weights

    @staticmethod
    def _weigh(
        gate: LayerGate,
        x: torch.Tensor,
        z: torch.Tensor,
        batch: LoRABatchInfo,
        weights: torch.Tensor | None,
        stats: GateStats | None,
    ) -> torch.Tensor:
        """The gate on the same row blocks as the torch backend: all rows against the unique
        slots, or the decode rows against their own slots and each prefill chunk against its
        sequence's (the keys of K slots, not of K per token)."""
        if batch.unique_slots is not None:
            return gate.weigh(x, z, batch.unique_slots, weights, stats, slice(None))
        nd, ns = batch.num_decode, batch.num_decode_with_sets
        assert weights is not None  # rows on their own slots always carry token weights (build_lora_batch)
        decode = [gate.weigh(x[:ns], z[:ns], batch.lora_slots[:ns], weights[:ns], stats, slice(0, ns))] if ns else []
        prefill = [
            gate.weigh(x[o : o + n], z[o : o + n], batch.lora_slots[i], weights[o : o + n], stats, slice(o, o + n))
            for i, (o, n) in enumerate(batch.prefill_spans, start=nd)
        ]
        return torch.cat([*decode, weights[ns:nd], *prefill])  # rows ns..nd have no adapter (z unset there)

    def apply_blocks(
        self, x: torch.Tensor, out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, rows: BlockRows
    ) -> None:
        if _needs_autograd(x, out, A, B):
            return super().apply_blocks(x, out, A, B, rows)
        ops.apply_blocks(x, out, A, B, rows.rows, rows.slots, rows.weights)

    def _expert_plan(self, rows: int, slots: torch.Tensor, rank: int) -> ops.Segments:
        """All `rows` against the adapter's E expert slots at `rank`: one segment."""
        key = (rows, slots.data_ptr(), rank)
        seg = self._expert_plans.get(key)
        if seg is None:
            if len(self._expert_plans) >= MAX_EXPERT_PLANS:
                self._expert_plans.clear()
            seg = self._expert_plans[key] = ops.plan([(0, rows)], slots.view(1, -1), [[rank] * len(slots)])
        return seg

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
        """weights [T, n, E], per token, module and expert (None: all 1)."""
        if _needs_autograd(x, out, weights):
            return super().apply_experts(x, out, stack, slots, slot_range, rank, weights)
        seg = self._expert_plan(len(x), slots, rank)
        ops.expand(ops.shrink(x, stack, seg), weights, out, stack, seg, self.tables)

    def selected_expert_outputs(
        self,
        x: torch.Tensor,
        stack: GroupStack,
        slots: torch.Tensor,
        slot_range: tuple[int, int] | None,
        rank: int,
        experts: torch.Tensor,
    ) -> list[torch.Tensor]:
        """As LoRABackend's: every expert's shrink, then one expand of T*k rows whose z is zero but
        for the row's selected expert, into a fresh [T*k, sum d_out_j] split per module."""
        if _needs_autograd(x):
            return super().selected_expert_outputs(x, stack, slots, slot_range, rank, experts)
        T, k = experts.shape
        z = ops.shrink(x, stack, self._expert_plan(T, slots, rank))  # [T, E, n*rank]
        E, nr = z.shape[1], z.shape[2]
        pick = torch.zeros(T, k, E, 1, dtype=z.dtype, device=z.device).scatter_(2, experts.view(T, k, 1, 1), 1.0)
        z_k = (z.view(T, 1, E, nr) * pick).view(T * k, E, nr)
        out = x.new_zeros(T * k, stack.out_columns[-1][1])
        ops.expand(z_k, None, out, stack, self._expert_plan(T * k, slots, rank), self.tables)
        return [out[:, c0:c1].view(T, k, -1) for c0, c1 in stack.out_columns]

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
        """As LoRABackend's: the T*k inputs against every expert, each row's own expert picked and
        weighted in rank space ([T, E, r], summed per expert), then one expand of the T rows."""
        if _needs_autograd(xk, out, weights):
            return super().apply_routed_inputs(xk, out, stack, slots, slot_range, rank, experts, weights)
        T, k, _ = xk.shape
        z = ops.shrink(xk.reshape(T * k, -1), stack, self._expert_plan(T * k, slots, rank))  # [T*k, E, r]
        E, r = z.shape[1], z.shape[2]
        z = z.view(T, k, E, r)
        own = z.gather(2, experts.view(T, k, 1, 1).expand(T, k, 1, r)).squeeze(2) * weights.unsqueeze(-1).float()
        per_expert = z.new_zeros(T, E, r).scatter_add_(1, experts.unsqueeze(-1).expand(T, k, r), own)
        ops.expand(per_expert, None, out, stack, self._expert_plan(T, slots, rank), self.tables)
