"""The block manager alone: allocation as sequences grow, freeing, prefix-cache sharing keyed by
tokens and adapter set, LRU eviction of unreferenced cached blocks."""

import subprocess
import sys

from mole_serve.engine.block_manager import BlockManager
from mole_serve.engine.request import SamplingParams, Sequence


def seq(tokens, key=(), **sampling) -> Sequence:
    s = Sequence(list(tokens), SamplingParams(**sampling))
    s.prefix_key = key
    return s


def computed(bm: BlockManager, s: Sequence) -> None:
    """What a step does once the sequence's known tokens ran."""
    s.num_computed = len(s.token_ids)
    bm.commit(s)


def test_block_manager_imports_no_torch():
    code = "import sys, mole_serve.engine.block_manager; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocate_grow_and_free():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = seq(range(6))
    assert bm.allocate(a) and len(a.block_table) == 2 and bm.num_free == 4 and a.num_computed == 0
    computed(bm, a)
    a.token_ids += [6, 7]  # positions 6, 7 still fit the second block
    assert bm.can_append(a, 2)
    bm.append(a, 2)
    assert len(a.block_table) == 2
    computed(bm, a)
    a.token_ids.append(8)  # position 8 needs a third block
    bm.append(a, 1)
    assert len(a.block_table) == 3 and bm.num_used == 3
    big = seq(range(100, 113))  # 4 blocks, 3 free: refused, nothing taken
    assert not bm.allocate(big) and bm.num_free == 3 and big.block_table == []
    assert not bm.can_append(seq(range(1)), 16)
    bm.free(a)
    assert bm.num_free == 6 and a.block_table == [] and bm.allocate(big)


def test_full_computed_blocks_are_shared_under_the_same_key_only():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(10), key=("a0",))
    bm.allocate(a)
    computed(bm, a)  # blocks 0..3 and 4..7 are full: hashed; 8..9 stays private
    assert len(a.block_hashes) == 2
    b = seq(list(range(8)) + [50, 51, 52], key=("a0",))
    assert bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed == 8
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [2, 2]
    assert bm.stats.hit_tokens == 8 and bm.stats.queried_tokens == 10 + 11
    other = seq(range(10), key=("a1",))  # the same tokens under another adapter set: nothing shared
    assert bm.allocate(other) and other.num_computed == 0 and not set(other.block_table) & set(a.block_table)
    exact = seq(range(8), key=("a0",))  # all cached, but the last token must run to give logits
    assert bm.allocate(exact) and exact.num_computed == 4
    wants_logprobs = seq(range(10), key=("a0",), prompt_logprobs=0)  # needs every prompt row computed
    assert bm.allocate(wants_logprobs) and wants_logprobs.num_computed == 0
    diverged = seq([0, 1, 2, 9] + list(range(4, 8)) + [1], key=("a0",))  # block 2 chains on block 1's hash
    assert bm.allocate(diverged) and diverged.num_computed == 0


def test_freed_cached_blocks_serve_hits_until_evicted_least_recent_first():
    bm = BlockManager(num_blocks=5, block_size=2)
    a, b = seq([1, 2, 3, 4, 5]), seq([7, 8, 9])
    for s in (a, b):
        bm.allocate(s)
        computed(bm, s)
    assert (a.block_table, b.block_table) == ([0, 1, 2], [3, 4])
    bm.free(a)  # its full blocks [1 2] [3 4] stay cached; the partial [5] is reused first
    bm.free(b)  # [7 8] cached, more recently than a's
    assert bm.num_used == 0
    hit = seq([1, 2, 3, 4, 6])
    assert bm.allocate(hit) and hit.num_computed == 4 and hit.block_table == [0, 1, 4]
    bm.free(hit)  # a's blocks are now the most recently freed
    fresh = seq([20, 21, 22, 23, 24, 25])  # private blocks first, then the least recent cached one: b's
    assert bm.allocate(fresh) and fresh.block_table == [4, 2, 3] and bm.stats.evictions == 1
    bm.free(fresh)
    assert bm.allocate(seq([7, 8, 0])) and bm.stats.hit_tokens == 4  # b's [7 8] is gone
    assert bm.allocate(seq([1, 2, 3, 4, 0])) and bm.stats.hit_tokens == 8  # a's prefix is still there


def test_a_twin_block_computed_at_the_same_time_stays_private():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = seq([1, 2, 3]), seq([1, 2, 4])
    bm.allocate(a)
    bm.allocate(b)  # before a's first block is computed: no hit
    computed(bm, a)
    computed(bm, b)
    assert a.block_table[0] != b.block_table[0] and bm.blocks[b.block_table[0]].hash is None
    bm.free(b)
    assert bm.allocate(seq([1, 2, 5])) and bm.stats.hit_tokens == 2
