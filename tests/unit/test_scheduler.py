"""The scheduler is pure Python: token budget, chunked prefill, admission by KV blocks,
preemption when blocks run out, freeing."""

import subprocess
import sys

from mole_serve.engine.block_manager import BlockManager
from mole_serve.engine.request import FinishReason, SamplingParams, Sequence, SequenceStatus
from mole_serve.engine.scheduler import Scheduler


def test_scheduler_imports_no_torch():
    code = "import sys, mole_serve.engine.scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def step(sched: Scheduler):
    """Schedule, then what the engine does after the forward: advance, append sampled tokens."""
    batch = sched.schedule()
    sampled = [s.seq for s in batch.scheduled if s.samples]
    sched.advance(batch)
    for seq in sampled:
        seq.token_ids.append(0)
    return batch


def test_budget_chunked_prefill_and_the_batch_cap():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_prefill_tokens=8)
    a, b, c = (Sequence(list(range(n)), SamplingParams()) for n in (5, 12, 3))
    for seq in (a, b, c):
        sched.add(seq)
    batch = step(sched)  # a whole (5), b's first chunk (3); c waits: the batch holds 2
    assert [(s.seq, s.num_tokens) for s in batch.prefill] == [(a, 5), (b, 3)]
    assert (len(a.token_ids), len(b.token_ids)) == (6, 12)  # a sampled its first token, b did not
    assert list(sched.waiting) == [c]
    batch = step(sched)  # a decodes (outside the prefill budget), b takes the 8 of the budget
    assert [(s.seq, s.num_tokens) for s in batch.decode] == [(a, 1)]
    assert [(s.seq, s.num_tokens) for s in batch.prefill] == [(b, 8)]
    used = sched.blocks.num_used
    sched.finish(a, FinishReason.STOP)  # frees its blocks at once: c is admitted next step
    assert sched.blocks.num_used == used - 2 and a.block_table == []
    batch = sched.schedule()
    assert [s.seq for s in batch.decode] == [b] and [s.seq for s in batch.prefill] == [c]  # b: its last prompt token


def test_admission_waits_for_blocks_not_for_a_slot_count():
    sched = Scheduler(BlockManager(6, 4), max_num_seqs=100, max_prefill_tokens=64)
    short = [Sequence([i, i + 1], SamplingParams()) for i in range(0, 12, 2)]  # one block each
    long = Sequence(list(range(20)), SamplingParams())  # 5 blocks
    for seq in [*short, long]:
        sched.add(seq)
    step(sched)
    assert sched.running == short and list(sched.waiting) == [long]  # 6 short ones fill the 6 blocks
    for seq in short[:5]:
        sched.finish(seq, FinishReason.STOP)
    assert [s.seq for s in step(sched).prefill] == [long]


def test_out_of_blocks_preempts_the_newest_and_recomputes_it():
    sched = Scheduler(BlockManager(4, 2), max_num_seqs=8, max_prefill_tokens=64)
    old, new = Sequence([1, 2, 3], SamplingParams()), Sequence([4, 5, 6], SamplingParams())
    sched.add(old)
    sched.add(new)
    step(sched)  # both prefilled into 2 blocks each; each sampled a 4th token
    assert sched.blocks.num_free == 0
    batch = step(sched)  # old's 4th token fits its 2nd block, and so does new's
    assert [s.seq for s in batch.decode] == [old, new]
    batch = step(sched)  # both need a 3rd block: new (the newest) is preempted for old
    assert [s.seq for s in batch.decode] == [old] and list(sched.waiting) == [new]
    assert new.status is SequenceStatus.WAITING and new.num_computed == 0 and new.block_table == []
    assert new.token_ids == [4, 5, 6, 0, 0] and sched.blocks.stats.preemptions == 1
    sched.finish(old, FinishReason.STOP)
    # readmitted: its first block was still cached (old took the other one), the rest is recomputed
    batch = step(sched)
    assert [(s.seq, s.num_tokens) for s in batch.prefill] == [(new, 3)] and new.num_computed == 5
    assert sched.blocks.stats.hit_tokens == 2


def test_a_lone_sequence_that_outgrows_the_pool_preempts_itself_and_waits():
    sched = Scheduler(BlockManager(2, 2), max_num_seqs=8, max_prefill_tokens=64)
    seq = Sequence([1, 2, 3], SamplingParams())
    sched.add(seq)
    step(sched)
    step(sched)
    assert not step(sched) and list(sched.waiting) == [seq]  # 5 positions, 4 in the pool
    assert sched.blocks.num_free == 2


def test_adapter_admission_waits_until_slots_free():
    free = {"n": 1}

    def acquire(seq):
        if free["n"] == 0:
            return False
        free["n"] -= 1
        return True

    def release(seq):
        free["n"] += 1

    sched = Scheduler(BlockManager(16, 4), 4, 64, acquire, release)
    a, b = Sequence([1, 2], SamplingParams()), Sequence([3, 4], SamplingParams())
    sched.add(a)
    sched.add(b)
    assert [s.seq for s in sched.schedule().prefill] == [a]
    assert sched.blocks.num_used == 1  # b took no block: its adapters could not load
    sched.finish(a, FinishReason.LENGTH)
    assert [s.seq for s in sched.schedule().prefill] == [b]
    sched.finish(b, FinishReason.ABORT)
    assert not sched.has_unfinished() and free["n"] == 1 and sched.blocks.num_used == 0
