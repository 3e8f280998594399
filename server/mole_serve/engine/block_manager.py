"""KV blocks: which pool blocks hold which sequence's keys and values. Pure Python, no torch.

The KV pool is cut into fixed blocks of `block_size` token positions; a sequence owns a block
table (its blocks in position order) that grows as it does, so memory follows the tokens held,
not `max_model_len`. Blocks come from one free list and go back to it when a sequence finishes,
aborts or is preempted.

Prefix caching (vLLM's automatic prefix caching, nano-vllm's block hashes): a block whose
positions are all computed gets a hash chaining its parent block's hash, its token ids and the
sequence's `prefix_key`. The key names the adapter set (and the gate) that produced the keys and
values: a LoRA on q/k/v, or anything before them in the network, changes them, so KV computed
under one set must never serve another. A new sequence whose prompt starts with hashed blocks
takes them read-only (a reference count) and computes only the rest. A freed hashed block stays
in the free list with its contents; it is reused as cache until it is allocated for new tokens,
least recently freed first (LRU eviction of unreferenced cached blocks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import cast

from mole_serve.engine.request import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once every position is computed; None: private to one sequence
    token_ids: tuple[int, ...] = ()  # the tokens behind `hash`, compared on a hit (no trust in hashes alone)


@dataclass
class BlockStats:
    """Counters for /metrics: prefix-cache lookups in tokens, and preemptions."""

    queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    hit_tokens: int = 0  # of those, found computed
    preemptions: int = 0
    evictions: int = 0  # cached blocks reused for new tokens


def block_hash(parent: int | None, token_ids: tuple[int, ...], prefix_key: Hashable) -> int:
    return hash((parent, token_ids, prefix_key))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks, least recently freed first: allocation takes from the front, so a
        # cached block lives as long as possible.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # hash -> block id
        self.stats = BlockStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks referenced by a running sequence (cached free blocks are not used)."""
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- admission ---
    def allocate(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its known tokens, the leading full blocks from
        the prefix cache where they are there; sets seq.num_computed to the cached tokens. False
        (and nothing taken) if the free list cannot cover the rest."""
        assert not seq.block_table
        hits = self._cached_prefix(seq)
        # a hit that is still free must leave the free list, so it cannot count toward the rest
        needed = self.blocks_for(len(seq.token_ids)) - len(hits)
        if needed > self.num_free - sum(self.blocks[b].ref_count == 0 for b in hits):
            return False
        for block_id in hits:
            self._take(block_id)
        seq.block_table = list(hits)
        seq.block_hashes = [cast(int, self.blocks[b].hash) for b in hits]  # cached blocks are hashed
        seq.num_computed = len(hits) * self.block_size
        for _ in range(needed):
            seq.block_table.append(self._take(self._evict_front()))
        if self.enable_prefix_caching and seq.sampling.prompt_logprobs is None:
            self.stats.queried_tokens += len(seq.token_ids)
            self.stats.hit_tokens += seq.num_computed
        return True

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks the sequence's tokens start with. At least one token is left to compute
        (its logits give the next token), and a request for prompt logprobs computes them all."""
        if not self.enable_prefix_caching or seq.sampling.prompt_logprobs is not None:
            return []
        hits, parent, bs = [], None, self.block_size
        for i in range((len(seq.token_ids) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent = block_hash(parent, tokens, seq.prefix_key)
            block_id = self._cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    # --- growth ---
    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        return self._missing(seq, num_tokens) <= self.num_free

    def append(self, seq: Sequence, num_tokens: int) -> None:
        """Blocks for the sequence's next `num_tokens` positions (call can_append first)."""
        for _ in range(self._missing(seq, num_tokens)):
            seq.block_table.append(self._take(self._evict_front()))

    def _missing(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, self.blocks_for(seq.num_computed + num_tokens) - len(seq.block_table))

    def commit(self, seq: Sequence) -> None:
        """After a step: hash the sequence's blocks that became fully computed, so later requests
        (or this one, if preempted) find them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens, seq.prefix_key)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if h not in self._cached:  # a twin computed at the same time stays private and is freed normally
                block.hash, block.token_ids = h, tokens
                self._cached[h] = block.block_id

    # --- release ---
    def free(self, seq: Sequence) -> None:
        """Return a sequence's blocks; last blocks first, so a prompt's tail is evicted before its head."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:  # nothing worth keeping: reuse it first
                    self._free.move_to_end(block_id, last=False)
        seq.block_table, seq.block_hashes = [], []

    # --- internals ---
    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1
        return block_id

    def _evict_front(self) -> int:
        """The least recently freed block, its cached contents dropped."""
        block_id = next(iter(self._free))
        block = self.blocks[block_id]
        if block.hash is not None:
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
                self.stats.evictions += 1
            block.hash, block.token_ids = None, ()
        return block_id
