"""Turns a scheduled batch into tensors, runs the model once, samples. Knows nothing of HTTP."""

from __future__ import annotations

import torch

from server.engine.kv_cache import AttentionMetadata, KVCache
from server.engine.model import DecoderModel
from server.engine.request import Sequence
from server.engine.sampler import make_generator, sample
from server.engine.scheduler import Batch
from server.lora.batch import build_lora_batch
from server.lora.pool import LoRAPool


class ModelRunner:
    def __init__(self, model: DecoderModel, kv: KVCache, pool: LoRAPool) -> None:
        self.model, self.kv, self.pool = model, kv, pool
        self.device = model.device
        self._generators: dict[str, torch.Generator] = {}
        self.last_logits: torch.Tensor | None = None

    def release(self, seq: Sequence) -> None:
        self._generators.pop(seq.request_id, None)

    def run(self, batch: Batch) -> list[int]:
        """One forward over the batch; returns the next token of each sequence whose chunk reached
        the end of its known tokens, in batch order."""
        logits = self.forward_logits(batch)
        self.last_logits = logits  # [N, V]: the step's distributions, read by tests and logprobs
        sampled = [s.seq for s in batch.scheduled if s.samples]
        gens = [self._generator(seq) for seq in sampled]
        return sample(logits, [seq.sampling for seq in sampled], gens)

    @torch.inference_mode()
    def forward_logits(self, batch: Batch) -> torch.Tensor:
        """float32 logits [N, V] of the sequences that sample this step, in batch order."""
        scheduled = batch.scheduled
        ids, positions, slots, sample_rows = [], [], [], []
        for s in scheduled:
            start = s.seq.num_computed
            ids += s.seq.token_ids[start : start + s.num_tokens]
            positions += range(start, start + s.num_tokens)
            slots += [s.seq.kv_slot] * s.num_tokens
            if s.samples:
                sample_rows.append(len(ids) - 1)  # the chunk's last row
        dev = self.device
        meta = self.attention_metadata(batch, torch.tensor(slots, device=dev), torch.tensor(positions, device=dev))
        lora = build_lora_batch(
            [(s.seq.lora_slots, [a.weight for a in s.seq.adapters]) for s in scheduled],
            [s.num_tokens for s in scheduled],
            len(batch.decode),
            dev,
            self.model.dtype,
            [s.seq.gated for s in scheduled] if self.pool.layer_gates is not None else None,
            gather_cache=self.pool.gather_cache,
        )
        logits = self.model.forward(
            torch.tensor(ids, device=dev),
            meta.write_positions,
            self.kv,
            meta,
            torch.tensor(sample_rows, dtype=torch.long, device=dev),
            self.pool.stacks,
            lora,
            self.pool.layer_gates,
        )
        totals = lora.gate_totals() if lora is not None else None
        for s, sums in zip(scheduled, totals or ()):
            if s.seq.gated:
                seq = s.seq
                seq.gate_sums = [a + b for a, b in zip(seq.gate_sums, sums)] if seq.gate_sums else sums
                seq.gate_count += s.num_tokens * self.model.num_layers
        return logits

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.sampling.greedy:
            return None
        if seq.request_id not in self._generators:
            self._generators[seq.request_id] = make_generator(seq.sampling.seed)
        return self._generators[seq.request_id]

    def attention_metadata(self, batch: Batch, slots: torch.Tensor, positions: torch.Tensor) -> AttentionMetadata:
        dev = self.device
        group = self.model.num_heads // self.model.num_kv_heads
        decode_slots = [s.seq.kv_slot for s in batch.decode]
        lens = [s.seq.num_computed + 1 for s in batch.decode]
        max_len = max(lens, default=0)
        contiguous = bool(decode_slots) and decode_slots == list(range(decode_slots[0], decode_slots[-1] + 1))
        mask = None
        if lens and min(lens) != max_len:
            lens_t = torch.tensor(lens, device=dev)
            mask = (torch.arange(max_len, device=dev)[None, :] < lens_t[:, None]).view(len(lens), 1, 1, max_len)
        prefill = []
        for s in batch.prefill:
            start, n = s.seq.num_computed, s.num_tokens
            # Query row i (position start+i) sees keys 0..start+i; repeated for the G heads of a group.
            causal = torch.arange(start + n, device=dev)[None, :] <= torch.arange(start, start + n, device=dev)[:, None]
            prefill.append((s.seq.kv_slot, start, n, causal.repeat(group, 1)))
        return AttentionMetadata(
            write_slots=slots,
            write_positions=positions,
            num_decode=len(batch.decode),
            decode_slots=torch.tensor(decode_slots, dtype=torch.long, device=dev),
            decode_slot_range=(decode_slots[0], decode_slots[-1] + 1) if contiguous else None,
            decode_max_len=max_len,
            decode_mask=mask,
            prefill=prefill,
        )
