"""The scheduler is pure Python: token budget, chunked prefill, admission, freeing."""

import subprocess
import sys

from server.engine.request import FinishReason, SamplingParams, Sequence
from server.engine.scheduler import Scheduler


def test_scheduler_imports_no_torch():
    code = "import sys, server.engine.scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def advance(batch):
    for s in batch.scheduled:
        s.seq.num_computed += s.num_tokens
        if s.seq.num_uncomputed == 0:
            s.seq.token_ids.append(0)


def test_budget_chunked_prefill_and_slots():
    sched = Scheduler(max_num_seqs=2, max_num_batched_tokens=8)
    a, b, c = (Sequence(list(range(n)), SamplingParams()) for n in (5, 12, 3))
    for seq in (a, b, c):
        sched.add(seq)
    batch = sched.schedule()  # a whole (5), b's first chunk (3); c waits for a KV slot
    assert [(s.seq, s.num_tokens) for s in batch.prefill] == [(a, 5), (b, 3)]
    assert [s.samples for s in batch.prefill] == [True, False]
    assert list(sched.waiting) == [c]
    advance(batch)
    batch = sched.schedule()  # decode first, then b's next chunk within the budget
    assert [(s.seq, s.num_tokens) for s in batch.decode] == [(a, 1)]
    assert [(s.seq, s.num_tokens) for s in batch.prefill] == [(b, 7)]
    advance(batch)
    sched.finish(a, FinishReason.STOP)  # frees its slot at once: c is admitted next step
    assert sched.kv_slots.num_used == 1 and a.kv_slot is None
    batch = sched.schedule()
    assert [s.seq for s in batch.prefill] == [b, c] and c.kv_slot == 0


def test_adapter_admission_waits_until_slots_free():
    free = {"n": 1}

    def acquire(seq):
        if free["n"] == 0:
            return False
        free["n"] -= 1
        return True

    def release(seq):
        free["n"] += 1

    sched = Scheduler(4, 64, acquire, release)
    a, b = Sequence([1, 2], SamplingParams()), Sequence([3, 4], SamplingParams())
    sched.add(a)
    sched.add(b)
    assert [s.seq for s in sched.schedule().prefill] == [a]
    assert sched.kv_slots.num_used == 1  # b's KV slot was given back when its adapters could not load
    sched.finish(a, FinishReason.LENGTH)
    assert [s.seq for s in sched.schedule().prefill] == [b]
    sched.finish(b, FinishReason.ABORT)
    assert not sched.has_unfinished() and free["n"] == 1
