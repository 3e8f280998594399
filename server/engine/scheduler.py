"""Which sequences run in the next step, and how many tokens each. Pure Python: no torch here.

Every running sequence owns one KV slot (a row of max_model_len positions), so admission never
over-commits memory and nothing is ever preempted. A step takes every decoding sequence (one
token each) and then prefill chunks, oldest first, until the token budget is spent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from server.engine.request import FinishReason, Sequence, SequenceStatus


class SlotAllocator:
    """Free list of KV slots; always hands out the lowest free one so the running batch stays
    packed at the start of the cache (a contiguous slice needs no gather)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = set(range(num_slots))

    def allocate(self) -> int | None:
        if not self._free:
            return None
        slot = min(self._free)
        self._free.remove(slot)
        return slot

    def free(self, slot: int) -> None:
        self._free.add(slot)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens of this sequence computed in the step

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the known tokens, so the step samples the next one."""
        return self.seq.num_computed + self.num_tokens == len(self.seq.token_ids)


@dataclass
class Batch:
    decode: list[ScheduledSeq]  # one token each, sorted by KV slot
    prefill: list[ScheduledSeq]  # chunks of prompts

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        return self.decode + self.prefill

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        acquire_adapters: Callable[[Sequence], bool] = lambda seq: True,
        release_adapters: Callable[[Sequence], None] = lambda seq: None,
    ) -> None:
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_slots = SlotAllocator(max_num_seqs)
        # Adapter residency is the pool's business; these hooks pin and unpin a sequence's set.
        self._acquire_adapters = acquire_adapters
        self._release_adapters = release_adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        budget = self.max_num_batched_tokens
        decode, prefill = [], []
        for seq in self.running:
            if seq.num_uncomputed == 1 and budget > 0:
                decode.append(ScheduledSeq(seq, 1))
                budget -= 1
        for seq in self.running:
            if seq.num_uncomputed > 1 and budget > 0:
                n = min(seq.num_uncomputed, budget)
                prefill.append(ScheduledSeq(seq, n))
                budget -= n
        while self.waiting and budget > 0 and self._admit(self.waiting[0]):
            seq = self.waiting.popleft()
            n = min(seq.num_uncomputed, budget)
            prefill.append(ScheduledSeq(seq, n))
            budget -= n
        decode.sort(key=lambda s: s.seq.kv_slot)
        return Batch(decode, prefill)

    def _admit(self, seq: Sequence) -> bool:
        slot = self.kv_slots.allocate()
        if slot is None:
            return False
        if not self._acquire_adapters(seq):
            self.kv_slots.free(slot)
            return False
        seq.kv_slot = slot
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return True

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence wherever it is and free its KV slot and adapter pins at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.kv_slots.free(seq.kv_slot)
            self._release_adapters(seq)
            seq.kv_slot = None
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
