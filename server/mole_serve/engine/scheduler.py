"""Which sequences run in the next step, and how many tokens each. Pure Python: no torch here.

KV memory is admitted by blocks (block_manager.py): a waiting sequence enters the batch when
the free blocks cover its known tokens (less what the prefix cache already holds) and its
adapters can be made resident. A step takes every decoding sequence (one token each), then
prefill chunks, oldest first, until the prefill budget is spent. Decodes are outside that budget
(unlike vLLM's max_num_batched_tokens, where they count): with a small budget, which keeps a
CPU step short, a batch of decoding sequences as large as the budget would otherwise leave no
room to admit anyone. When a decoding sequence needs a
new block and none is free, the newest running sequence is preempted: its blocks go back (its
full blocks stay cached) and it waits at the head of the queue to be recomputed, so a request
never fails for lack of KV memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mole_serve.engine.block_manager import BlockManager
from mole_serve.engine.request import FinishReason, Sequence, SequenceStatus


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
    decode: list[ScheduledSeq]  # one token each
    prefill: list[ScheduledSeq]  # chunks of prompts (or of a preempted sequence's tokens)

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
        blocks: BlockManager,
        max_num_seqs: int,
        max_prefill_tokens: int,
        acquire_adapters: Callable[[Sequence], bool] = lambda seq: True,
        release_adapters: Callable[[Sequence], None] = lambda seq: None,
        decode_order: Callable[[Sequence], tuple] | None = None,
    ) -> None:
        self.blocks = blocks
        # The decode rows' order in a step (stable sort by this key): the runner groups sequences
        # that take the same LoRA path, so that each path reads its rows as one slice.
        self._decode_order = decode_order
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        # Adapter residency is the pool's business; these hooks pin and unpin a sequence's set.
        self._acquire_adapters = acquire_adapters
        self._release_adapters = release_adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        decode, prefill = [], []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.num_uncomputed == 1:
                while not self.blocks.can_append(seq, 1) and seq in self.running:
                    self._preempt(self.running[-1])
                if seq not in self.running:  # it was the newest
                    break
                self.blocks.append(seq, 1)
                decode.append(ScheduledSeq(seq, 1))
            i += 1
        if (order := self._decode_order) is not None:
            decode.sort(key=lambda s: order(s.seq))
        budget = self.max_prefill_tokens
        for seq in self.running:  # admission gave them blocks for all their known tokens
            if seq.num_uncomputed > 1 and budget > 0:
                n = min(seq.num_uncomputed, budget)
                prefill.append(ScheduledSeq(seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and self._admit(self.waiting[0]):
            seq = self.waiting.popleft()
            n = min(seq.num_uncomputed, budget)
            prefill.append(ScheduledSeq(seq, n))
            budget -= n
        return Batch(decode, prefill)

    def advance(self, batch: Batch) -> None:
        """After the step ran: its tokens are computed; full blocks join the prefix cache."""
        for s in batch.scheduled:
            s.seq.num_computed += s.num_tokens
            self.blocks.commit(s.seq)

    def _admit(self, seq: Sequence) -> bool:
        leader = seq.leader  # another choice of the same prompt: wait until its prompt's blocks are cached
        if (
            leader is not None
            and leader.status is SequenceStatus.RUNNING
            and leader.num_computed < len(leader.prompt_ids)
        ):
            return False
        if not self._acquire_adapters(seq):  # first: the adapter set is part of the prefix key
            return False
        if not self.blocks.allocate(seq):
            self._release_adapters(seq)
            return False
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Back to the head of the queue, to be recomputed from its tokens (prompt + output so far)."""
        self._stop_running(seq)
        seq.num_computed = 0
        seq.gate_sums, seq.gate_count = [], 0  # recomputing sums them again
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.blocks.stats.preemptions += 1

    def _stop_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        self._release_adapters(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence wherever it is and free its KV blocks and adapter pins at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self._stop_running(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
