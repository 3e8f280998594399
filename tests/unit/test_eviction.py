"""The pool's parts: eviction policies (lora/eviction.py), the slot allocator (lora/slots.py), and
the pool driven through them with tiny adapters, down to the setting that picks the policy."""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import get_args

import pytest
import torch
from mole_serve.config import Settings
from mole_serve.lora.eviction import HALF_LIFE_PER_SLOT, LRFUPolicy, LRUPolicy, PolicyName, make_policy
from mole_serve.lora.kinds.base import TARGET_MODULES, AdapterWeights, LoRATargetSpec
from mole_serve.lora.pool import LoRAPool
from mole_serve.lora.slots import SlotAllocator

from tests.unit.helpers import engine_for, tiny_hf_model

SPEC = LoRATargetSpec(num_layers=1, shapes={m: (8, 8) for m in TARGET_MODULES})


def tiny_adapter(name: str) -> AdapterWeights:
    """A rank-1 LoRA on one module: what residency needs of an adapter, nothing more."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return AdapterWeights(
        name, rank=1, modules={(0, "q_proj"): (torch.randn(1, 8, generator=g), torch.randn(8, 1, generator=g))}
    )


def pool_of(slots: int, policy: PolicyName = "lru") -> LoRAPool:
    return LoRAPool(SPEC, slots, 64, torch.device("cpu"), torch.float32, tiny_adapter, policy)


def serve(pool: LoRAPool, names: list[str]) -> None:
    """One request per name, each done before the next starts."""
    for name in names:
        pool.release(pool.acquire([name]))


# --- policies ---
def test_lru_orders_exactly_as_an_ordered_dict_over_random_uses_and_departures():
    rng, policy, reference = random.Random(0), LRUPolicy(), OrderedDict()
    for _ in range(500):
        name = f"a{rng.randrange(12)}"
        if rng.random() < 0.2:
            policy.forget(name)
            reference.pop(name, None)
        else:
            policy.touch(name)
            reference[name] = None
            reference.move_to_end(name)
        candidates = [n for n in reference if rng.random() < 0.7]
        assert policy.victims(candidates) == [n for n in reference if n in candidates]


def test_a_candidate_never_touched_goes_first():
    for policy in (LRUPolicy(), LRFUPolicy(half_life=8)):
        policy.touch("a")
        assert policy.victims(["a", "new"]) == ["new", "a"]


def test_lrfu_keeps_a_frequently_used_adapter_that_lru_would_evict():
    uses = ["a", "a", "a", "b", "c"]  # a is the least recent, and the most used
    lru, lrfu = LRUPolicy(), LRFUPolicy(half_life=64)
    for name in uses:
        lru.touch(name)
        lrfu.touch(name)
    assert lru.victims(["a", "b", "c"]) == ["a", "b", "c"]
    assert lrfu.victims(["a", "b", "c"]) == ["b", "c", "a"]  # equal counts: the least recent first


def test_lrfu_aging_lets_an_old_favourite_go():
    """a was used 6 times, then b 3 times: a plain count keeps a; with a half-life of 2 uses, a's
    uses have faded below b's more recent ones."""
    uses = ["a"] * 6 + ["b"] * 3
    lfu, aging = LRFUPolicy(half_life=1e9), LRFUPolicy(half_life=2)
    for name in uses:
        lfu.touch(name)
        aging.touch(name)
    assert lfu.victims(["a", "b"]) == ["b", "a"]
    assert aging.victims(["a", "b"]) == ["a", "b"]


def test_lrfu_remembers_an_evicted_adapter_and_lru_does_not():
    lru, lrfu = LRUPolicy(), LRFUPolicy(half_life=64)
    for policy in (lru, lrfu):
        for name in ["a", "a", "a", "b"]:
            policy.touch(name)
        policy.forget("a")  # evicted, then wanted again
    assert lru.victims(["a", "b"]) == ["a", "b"]  # a newcomer
    assert lrfu.victims(["a", "b"]) == ["b", "a"]  # its three uses still count


def test_lrfu_drops_the_history_of_faded_adapters():
    policy = LRFUPolicy(half_life=4)
    for i in range(1000):
        policy.touch(f"tail{i}")
    assert len(policy._scores) < 100  # a few dozen uses fade within eight half-lives


def test_the_setting_names_every_policy():
    assert set(get_args(Settings.model_fields["eviction_policy"].annotation)) == set(get_args(PolicyName))
    assert isinstance(make_policy("lru", 8), LRUPolicy)
    assert make_policy("lrfu", 8).half_life == HALF_LIFE_PER_SLOT * 8
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("fifo", 8)


# --- the slot allocator ---
def test_allocator_takes_a_stack_of_free_slots_and_frees_an_adapter_with_its_experts():
    slots = SlotAllocator(6)
    assert slots.take(1) == [1] and slots.take(3) == [2, 3, 4]
    assert slots.held(2) == [2, 3, 4] and slots.num_free == 2
    assert slots.give_back(2) and slots.num_free == 5
    assert slots.take(1) == [2]  # the last primary given back is taken first


def test_allocator_keeps_a_pinned_adapters_slots_until_its_last_release():
    slots = SlotAllocator(2)
    primary = slots.take(1)[0]
    slots.pin(primary)
    slots.pin(primary)
    assert not slots.give_back(primary) and slots.num_free == 1  # replaced while two sequences run on it
    assert not slots.unpin(primary) and slots.num_free == 1
    assert slots.unpin(primary) and slots.num_free == 2 and not slots.pinned(primary)


def test_allocator_finds_the_run_that_displaces_fewest_and_never_a_pinned_slot():
    slots = SlotAllocator(7)
    held = [slots.take(1)[0] for _ in range(6)]  # slots 1..6 held, 7 free
    assert slots.cheapest_run(5, held) == ([3, 4, 5, 6, 7], [3, 4, 5, 6])
    assert slots.cheapest_run(5, [6, 1, 5, 2, 4, 3]) == ([3, 4, 5, 6, 7], [6, 5, 4, 3])  # in evictable's order
    assert slots.cheapest_run(5, [1, 2, 4, 5, 6]) is None  # slot 3 is pinned: no 5 consecutive slots avoid it
    for primary in (3, 4, 5, 6):
        slots.give_back(primary)
    slots.claim([3, 4, 5, 6, 7])
    assert slots.held(3) == [3, 4, 5, 6, 7] and slots.num_free == 0


# --- the pool through them ---
@pytest.mark.parametrize("policy", ["lru", "lrfu"])
def test_pool_never_evicts_a_pinned_adapter(policy):
    pool = pool_of(2, policy)
    serve(pool, ["c"] * 5)  # c is the most used, and unpinned
    a, b = pool.acquire(["a"]), pool.acquire(["b"])  # c goes: a and b are pinned
    assert not pool.is_resident("c") and pool.acquire(["c"]) is None
    pool.release(a)
    assert pool.acquire(["c"]) is not None
    assert pool.is_resident("b") and not pool.is_resident("a") and pool.evictions == 2
    pool.release(b)


def test_lru_pool_loads_what_an_lru_cache_of_as_many_slots_misses():
    rng = random.Random(1)
    names = [f"a{min(int(rng.paretovariate(1.0)), 20)}" for _ in range(400)]
    pool, cache, misses = pool_of(4), OrderedDict(), 0
    serve(pool, names)
    for name in names:
        misses += name not in cache
        cache[name] = None
        cache.move_to_end(name)
        if len(cache) > 4:
            cache.popitem(last=False)
    assert pool.loads == misses and pool.evictions == misses - 4


def test_lrfu_pool_keeps_the_frequently_used_adapter():
    pools = {policy: pool_of(2, policy) for policy in ("lru", "lrfu")}
    for pool in pools.values():
        serve(pool, ["a", "a", "a", "b", "c"])
    assert not pools["lru"].is_resident("a") and pools["lru"].is_resident("b")
    assert pools["lrfu"].is_resident("a") and not pools["lrfu"].is_resident("b")


def test_pool_forgets_a_replaced_adapter_in_its_policy():
    pool = pool_of(2)
    serve(pool, ["a", "b"])
    pool.put(tiny_adapter("a"))  # a new version: the resident copy goes
    assert not pool.is_resident("a") and pool.num_resident == 1
    serve(pool, ["c"])  # a free slot: b stays
    assert pool.is_resident("b") and pool.evictions == 0


def test_the_setting_reaches_the_engines_pool(tokenizer, monkeypatch):
    hf = tiny_hf_model()
    assert isinstance(engine_for(hf, tokenizer).pool.policy, LRUPolicy)
    policy = engine_for(hf, tokenizer, eviction_policy="lrfu", max_loras=4).pool.policy
    assert isinstance(policy, LRFUPolicy) and policy.half_life == HALF_LIFE_PER_SLOT * 4
    monkeypatch.setenv("MOLE_EVICTION_POLICY", "lrfu")
    assert Settings().eviction_policy == "lrfu"
