"""Turns a scheduled batch into tensors, runs the model once, samples. Knows nothing of HTTP."""

from __future__ import annotations

from collections.abc import Collection
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from mole_serve.engine.decode_step import StaticDecode, StepRow
from mole_serve.engine.kv_cache import AttentionMetadata, KVCache, PrefillChunk, block_slots, block_table_tensor
from mole_serve.engine.model import DecoderModel
from mole_serve.engine.request import Logprob, SamplingParams, Sequence
from mole_serve.engine.sampler import logprobs_of, make_generator, sample, to_device
from mole_serve.engine.scheduler import Batch, ScheduledSeq
from mole_serve.engine.structured import mask_logits
from mole_serve.lora.backends.base import LoRABackend
from mole_serve.lora.batch import build_block_rows, build_lora_batch, row_starts
from mole_serve.lora.context import LoRAContext
from mole_serve.lora.gate import EXTRA_COLUMNS, GateStats, MoLEGate
from mole_serve.lora.moe import ExpertRows
from mole_serve.lora.pool import LoRAPool


def summed(total: list[float], new: list[float]) -> list[float]:
    """A sequence's running per-column sums (gate weights, expert usage) plus one step's."""
    return [a + b for a, b in zip(total, new)] if total else new


@dataclass
class PrefillOutput:
    logits: torch.Tensor  # [R, V] float32, the rows asked for
    gate_stats: GateStats | None  # what the gate did per prompt (None: nothing gated)


class ModelRunner:
    def __init__(
        self,
        model: DecoderModel,
        kv: KVCache,
        pool: LoRAPool,
        backend: LoRABackend,
        native_blocks: bool = True,
        eos_token_ids: Collection[int] = (),
    ) -> None:
        self.model, self.kv, self.pool, self.backend = model, kv, pool, backend
        self.native_blocks = native_blocks  # run a lone MELoRA adapter as its mini LoRAs
        self.eos_token_ids = eos_token_ids  # what min_tokens masks besides a request's stop_token_ids
        self.device = model.device
        self._generators: dict[str, torch.Generator] = {}
        self.static: StaticDecode | None = None  # decode-only steps on persistent inputs (use_static_decode)

    def use_static_decode(
        self, max_rows: int, max_adapters: int, max_blocks: int, scratch_block: int, cuda_graphs: bool
    ) -> None:
        """Run decode-only steps of up to max_rows rows through StaticDecode (engine/decode_step.py),
        replayed as CUDA graphs when cuda_graphs and the model is on CUDA."""
        self.static = StaticDecode(
            self.model.forward,
            self.kv,
            self.pool,
            self.backend,
            max_rows,
            max_adapters,
            max_blocks,
            scratch_block,
            self.model.dtype,
            self.device,
            cuda_graphs,
        )
        self.static.capture_base()

    def release(self, seq: Sequence) -> None:
        self._generators.pop(seq.request_id, None)

    def run(self, batch: Batch) -> list[tuple[int, Logprob | None]]:
        """One forward over the batch; returns the next token of each sequence whose chunk reached
        the end of its known tokens, in batch order, with its logprob when the sequence asks."""
        logits = self.forward_logits(batch)  # [N, V]
        sampled = [s.seq for s in batch.scheduled if s.samples]
        gens = [self._generator(seq) for seq in sampled]
        # the grammars' masks, bias and penalties on copies: logprobs stay those of the model's raw
        # logits (vLLM's default)
        tokens = sample(mask_logits(logits, [seq.matcher for seq in sampled]), sampled, gens, self.eos_token_ids)
        asking = {i: k for i, seq in enumerate(sampled) if (k := seq.sampling.logprobs) is not None}  # row -> top
        logprobs: list[Logprob | None] = [None] * len(sampled)
        if asking:
            rows = to_device(list(asking), logits.device, torch.long)
            found = logprobs_of(logits.index_select(0, rows), tokens.index_select(0, rows), list(asking.values()))
            for i, lp in zip(asking, found):
                logprobs[i] = lp
        return list(zip(tokens.tolist(), logprobs))  # the step's one wait for the device

    @torch.inference_mode()
    def forward_logits(self, batch: Batch) -> torch.Tensor:
        """float32 logits [N, V] of the sequences that sample this step, in batch order."""
        scheduled = batch.scheduled
        ids: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[tuple[Sequence, int, int, list[int]]] = []  # (seq, start, top, rows)
        for s in scheduled:
            start = s.seq.num_computed
            if (top := s.seq.sampling.prompt_logprobs) is not None and start < s.seq.num_prompt_tokens:
                # the chunk's rows that predict a prompt token: logits beyond the sampled rows
                predicted = min(s.num_tokens, s.seq.num_prompt_tokens - 1 - start)
                prompt_rows.append((s.seq, start, top, list(range(len(ids), len(ids) + predicted))))
            ids += s.seq.token_ids[start : start + s.num_tokens]
            if s.samples:
                sample_rows.append(len(ids) - 1)  # the chunk's last row
        dev = self.device
        native = [self._native(s.seq) for s in scheduled]
        expert_slots = [self._expert_slot(s.seq) for s in scheduled]
        sets = [
            ((), ()) if nat or ex else (s.seq.lora_slots, [a.weight for a in s.seq.adapters])
            for s, nat, ex in zip(scheduled, native, expert_slots)
        ]
        if self.static is not None and not batch.prefill and self.static.bucket(len(scheduled)):
            step_rows = [
                StepRow(ids[i], s.seq.num_computed, s.seq.block_table, slots, weights, s.seq.gated, nat, ex)
                for i, (s, (slots, weights), nat, ex) in enumerate(zip(scheduled, sets, native, expert_slots))
            ]
            logits, lora = self.static.run(step_rows)
            extra = logits[:0]
        else:
            meta = self.attention_metadata(batch)
            lora = self.lora_context(
                sets,
                [s.num_tokens for s in scheduled],
                len(batch.decode),
                [s.seq.gated for s in scheduled],
                native=native,
                expert_slots=expert_slots,
            )
            extra_rows = [r for _, _, _, rows in prompt_rows for r in rows]
            logits = self.model.forward(
                to_device(ids, dev, torch.long),
                meta.positions,
                self.kv,
                meta,
                to_device(sample_rows + extra_rows, dev, torch.long),
                lora,
            )
            logits, extra = logits[: len(sample_rows)], logits[len(sample_rows) :]
        for seq, start, top, rows in prompt_rows:
            if start == 0:
                seq.prompt_logprobs = [None]  # the first prompt token has no prediction
            targets = to_device(seq.token_ids[start + 1 : start + 1 + len(rows)], dev, torch.long)
            seq.prompt_logprobs += logprobs_of(extra[: len(rows)], targets, [top] * len(rows))
            extra = extra[len(rows) :]
        totals = lora.stats.totals() if lora is not None and lora.stats is not None else ()
        for s, sums in zip(scheduled, totals):
            if s.seq.gated:
                seq = s.seq
                # its own candidates' columns, then the base column's share and the entropy: the
                # gathered path pads every row to the step's K, which differs between steps
                seq.gate_sums = summed(seq.gate_sums, [*sums[: len(seq.lora_slots)], *sums[-EXTRA_COLUMNS:]])
                seq.gate_count += s.num_tokens * self.model.num_layers
        for experts in lora.experts if lora is not None else ():
            slot = experts.experts.primary_range[0]
            for i, usage in zip(experts.seqs, experts.usage().tolist()):
                if i < len(scheduled) and expert_slots[i] == slot:  # a static step's rows: the bucket's
                    seq = scheduled[i].seq
                    seq.expert_usage = summed(seq.expert_usage, usage)
        return logits

    def row_group(self, seq: Sequence) -> tuple:
        """The sort key of a decode row (Scheduler's decode_order): sets on the slot stacks first,
        largest rank first (the torch backend's decode runs of one rank, LoRABatchInfo.decode_runs),
        then longest, then native blocks by shape, then each MoE-kind adapter's rows, then rows with
        no adapter. Each path's rows are then one slice of the step (views, not gathers), and the
        gathered op stops at the last row with a set (LoRABatchInfo.num_decode_with_sets)."""
        if (slot := self._expert_slot(seq)) is not None:
            return (2, slot)
        if (native := self._native(seq)) is not None:
            return (1, *native[0])
        if not seq.lora_slots:
            return (3,)
        return (0, -max(self.pool.slot_ranks[s] for s in seq.lora_slots), -len(seq.lora_slots))

    def _expert_slot(self, seq: Sequence) -> int | None:
        """The lora slot of the sequence's adapter when it is a mixture of LoRA experts (named alone)."""
        return seq.lora_slots[0] if len(seq.lora_slots) == 1 and seq.lora_slots[0] in self.pool.experts else None

    def _native(self, seq: Sequence) -> tuple[tuple[int, int], int, float] | None:
        """(block shape, lora slot, weight) when the sequence runs its adapter's native blocks: one
        adapter that has them (MELoRA), not gated. Weighted sets, gate candidates and merges run
        the dense blockdiag form, which every composition shares."""
        if not self.native_blocks or seq.gated or len(seq.lora_slots) != 1:
            return None
        shape = self.pool.block_shape.get(seq.lora_slots[0])
        return (shape, seq.lora_slots[0], seq.adapters[0].weight) if shape else None

    def lora_context(
        self,
        sets: Seq[tuple[Seq[int], Seq[float]]],
        num_tokens: Seq[int],
        num_decode: int,
        gated: Seq[bool],
        gate: MoLEGate | None = None,
        force_dense: bool = False,
        native: Seq[tuple[tuple[int, int], int, float] | None] = (),
        expert_slots: Seq[int | None] = (),
    ) -> LoRAContext | None:
        """The step's LoRA mapping over the pool's stacks (None: no adapter in the step). gate: a
        router other than the pool's (train-gate's, with autograd). native, expert_slots: per
        sequence, what _native and _expert_slot chose (its set in `sets` is then empty)."""
        blocks = build_block_rows(native, num_tokens, self.device, self.model.dtype) if any(native) else []
        experts = self._expert_rows(expert_slots, num_tokens, num_decode)
        pool = self.pool
        batch = build_lora_batch(
            sets, num_tokens, num_decode, self.device, self.model.dtype, force_dense, pool.slot_ranks
        )
        if batch is None and not blocks and not experts:
            return None
        gates = gate.layer_gates(pool.stacks) if gate is not None else pool.layer_gates
        stats = None
        if batch is not None:
            # one slot's bytes as the step reads them: the first batch.rank rows of each module block
            self.backend.prepare(batch, pool.version, pool.slot_bytes * min(batch.rank, pool.rank) // pool.rank)
            stats = GateStats.for_batch(batch, gated, num_tokens) if gates is not None else None
        return LoRAContext(pool.stacks, batch, self.backend, gates, stats, blocks, pool.block_stacks, experts)

    def _expert_rows(self, expert_slots: Seq[int | None], num_tokens: Seq[int], num_decode: int) -> list[ExpertRows]:
        """One ExpertRows per MoE-kind adapter of the step, over its sequences' rows."""
        by_slot: dict[int, list[int]] = {}
        for i, slot in enumerate(expert_slots):
            if slot is not None:
                by_slot.setdefault(slot, []).append(i)
        starts = row_starts(num_tokens)
        return [
            ExpertRows.for_step(self.pool.experts[slot], seqs, starts, list(num_tokens), num_decode)
            for slot, seqs in by_slot.items()
        ]

    def prefill(
        self,
        prompts: list[list[int]],
        adapter_sets: list[tuple[list[str], list[float]]],
        rows: torch.Tensor,
        gate: MoLEGate | None = None,
        keep_layer_weights: bool = False,
    ) -> PrefillOutput:
        """Forward whole prompts with their (adapter names, prior weights) in one step, on a scratch
        KV cache (the serving one is left alone), every set gated by `gate` (if given) on the
        dense path. rows: which of the flattened tokens' logits to return. Autograd follows the
        caller's mode: train-gate differentiates through the gate."""
        model, dev, bs = self.model, self.device, self.kv.block_size
        seqs, next_block = [], 0
        for ids in prompts:  # each prompt on blocks of its own in a pool just big enough
            seq = Sequence(ids, SamplingParams())
            seq.block_table = list(range(next_block, next_block + -(-len(ids) // bs)))
            next_block += len(seq.block_table)
            seqs.append(seq)
        kv = KVCache(model.num_layers, next_block, bs, model.num_kv_heads, model.head_dim, model.dtype, dev)
        batch = Batch([], [ScheduledSeq(seq, len(seq.token_ids)) for seq in seqs])
        meta = self.attention_metadata(batch)
        lora_slots: list[list[int]] = []
        for names, _ in adapter_sets:
            if (slots := self.pool.acquire(names)) is None:
                for s in lora_slots:
                    self.pool.release(s)
                raise RuntimeError(f"the adapter pool cannot hold {names} beside the other sets at once")
            lora_slots.append(slots)
        try:
            lora = self.lora_context(
                [(s, w) for s, (_, w) in zip(lora_slots, adapter_sets)],
                [len(p) for p in prompts],
                0,
                [gate is not None] * len(prompts),
                gate,
                force_dense=True,
            )
        finally:
            for s in lora_slots:
                self.pool.release(s)
        if lora is not None and lora.stats is not None and keep_layer_weights:
            lora.stats.layer_weights = []
        input_ids = torch.tensor([t for p in prompts for t in p], device=dev)
        logits = model.forward(input_ids, meta.positions, kv, meta, rows, lora)
        return PrefillOutput(logits, lora.stats if lora is not None else None)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.sampling.greedy:
            return None
        if seq.request_id not in self._generators:
            self._generators[seq.request_id] = make_generator(seq.sampling.seed)
        return self._generators[seq.request_id]

    def attention_metadata(self, batch: Batch) -> AttentionMetadata:
        """Each scheduled token's pool slot and position, and what each attends to, from the
        sequences' block tables."""
        dev, bs = self.device, self.kv.block_size
        group = self.model.num_heads // self.model.num_kv_heads
        decode = [s.seq for s in batch.decode]
        lens = [seq.num_computed + 1 for seq in decode]  # each attends to its past and itself
        tables = block_table_tensor([seq.block_table for seq in decode], dev)  # [Nd, max_blocks] int32
        decode_slots = block_slots(tables, bs)[:, : max(lens, default=0)].contiguous()
        lens_t = torch.tensor(lens, dtype=torch.long, device=dev)
        mask = None
        if lens and min(lens) != max(lens):
            mask = (torch.arange(max(lens), device=dev)[None, :] < lens_t[:, None]).view(len(lens), 1, 1, -1)
        slot_mapping = [decode_slots[torch.arange(len(lens), device=dev), lens_t - 1]]  # the new token's
        positions = [lens_t - 1]
        prefill = []
        for s in batch.prefill:
            start, n = s.seq.num_computed, s.num_tokens
            slots = block_slots(block_table_tensor([s.seq.block_table], dev), bs)[0, : start + n]
            slot_mapping.append(slots[start:])
            positions.append(torch.arange(start, start + n, device=dev))
            # Query row i (position start+i) sees keys 0..start+i; repeated for the G heads of a group.
            causal = torch.arange(start + n, device=dev)[None, :] <= torch.arange(start, start + n, device=dev)[:, None]
            prefill.append(PrefillChunk(start, n, slots if start else None, causal.repeat(group, 1)))
        rope_lens = None
        if batch.prefill and any(table.long_after is not None for table in self.model.ropes):
            # longrope picks its factors by the length of the whole sequence a forward sees: a
            # prompt's chunks all by the prompt's (model._rope_rows)
            known = [torch.full((s.num_tokens,), len(s.seq.token_ids), device=dev) for s in batch.prefill]
            rope_lens = torch.cat([lens_t, *known])
        return AttentionMetadata(
            slot_mapping=torch.cat(slot_mapping),
            positions=torch.cat(positions),
            num_decode=len(decode),
            decode_slots=decode_slots,
            decode_mask=mask,
            decode_block_tables=tables,
            decode_seq_lens=lens_t.int(),
            prefill=prefill,
            rope_lens=rope_lens,
        )
