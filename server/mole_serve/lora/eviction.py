"""Which resident adapter leaves the device slots first when a request needs room.

The pool asks a policy for an order over the adapters it may evict (resident, not pinned, not
wanted by the request being admitted) and evicts from the front until the request fits; how the
slots are then taken is the allocator's business (lora/slots.py). A policy sees only names: every
use of an adapter (`touch`, once per adapter named in each acquire), adapters leaving the slots
(`forget`), and the question (`victims`). Selected by Settings.eviction_policy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Protocol

PolicyName = Literal["lru", "lrfu"]  # config.Settings.eviction_policy spells the same names
HALF_LIFE_PER_SLOT = 16  # LRFU's half-life in uses, per device slot (see LRFUPolicy)
FADED = 2**-8  # an LRFU score under this (one use, eight half-lives ago) is dropped: it orders like none


class EvictionPolicy(Protocol):
    def touch(self, name: str) -> None:
        """A request uses `name` (resident by now)."""

    def forget(self, name: str) -> None:
        """`name` left the device slots: evicted, replaced or deleted."""

    def victims(self, candidates: Iterable[str]) -> list[str]:
        """Every candidate, the first to evict first. A candidate never touched comes first."""


class LRUPolicy:
    """Least recently used first: what vLLM's adapter cache does, and this pool's default."""

    def __init__(self) -> None:
        self._clock = 0
        self._last: dict[str, int] = {}  # resident name -> clock of its last use

    def touch(self, name: str) -> None:
        self._clock += 1
        self._last[name] = self._clock

    def forget(self, name: str) -> None:
        self._last.pop(name, None)

    def victims(self, candidates: Iterable[str]) -> list[str]:
        return sorted(candidates, key=lambda name: self._last.get(name, -1))


class LRFUPolicy:
    """Least recently/frequently used (LRFU, Lee et al. 2001): LFU whose counts age. Each use of an
    adapter adds 1 to its score and every score halves each `half_life` uses of the pool (all
    adapters' uses together); the lowest score goes first, the least recent among equals.

    Why frequency: requests name adapters with a skewed popularity (a few adapters take most of the
    traffic, a long tail takes the rest), each request largely independent of the one before. LRU
    lets every tail adapter that arrives push out whichever resident was used least recently, often
    a popular one that will be needed again a moment later, so the popular ones keep coming back
    from host memory. A count tells the popular adapters from the tail: a tail adapter comes in,
    serves its request and is the next to leave, while the popular ones stay.

    Why aging: popularity drifts (a new adapter takes over a task, a client stops sending), and a
    plain count would keep a former favourite resident for as long as its old uses outnumber the
    new favourite's. Halving the scores makes the past count less the older it is; the half-life
    spans the two extremes, LRU as it goes to zero, LFU as it grows. The pool sets it in proportion
    to its slots: in a pool of n slots the least popular adapter that still deserves one is used at
    most once every n uses on average (n adapters at least as popular share all the uses), so a
    half-life of several times n lets its score hold several of its uses; longer is slower to let a
    former favourite go (bench/eviction.py's drifting traffic), shorter is closer to LRU.

    Why the history outlives residency: an evicted adapter keeps its score (`forget` keeps it),
    so a popular adapter evicted in a burst of tail traffic comes back with its count, not as a
    newcomer. Scores that have faded to nothing are dropped once every half-life.

    Why not weigh load cost as well (S-LoRA's and Chameleon's cost-aware caching): the pool pads
    every slot to the same rank, so a resident adapter costs the same device memory whatever its own
    rank, and a reload is a host-to-device copy of one adapter, disk only when the CPU tier lost it.
    On skewed traffic adapters differ far more in how often they are asked for than in what a
    reload costs; a cost weight would be a second knob with nothing here to tune it on.
    """

    def __init__(self, half_life: float) -> None:
        self.half_life = half_life  # in uses of the pool (touches), > 0
        self._prune_every = max(round(half_life), 1)
        self._clock = 0
        self._scores: dict[str, tuple[float, int]] = {}  # name -> (score at its last use, clock of that use)

    def touch(self, name: str) -> None:
        self._clock += 1
        self._scores[name] = (self._score(name) + 1, self._clock)
        if self._clock % self._prune_every == 0:
            self._scores = {n: s for n, s in self._scores.items() if self._score(n) >= FADED}

    def forget(self, name: str) -> None:
        """The score stays: the adapter's past uses still say how likely it is to be asked for."""

    def victims(self, candidates: Iterable[str]) -> list[str]:
        return sorted(candidates, key=lambda name: (self._score(name), self._scores.get(name, (0, -1))[1]))

    def _score(self, name: str) -> float:
        """name's score now: its uses, each halved once per half-life since."""
        score, clock = self._scores.get(name, (0.0, self._clock))
        return score * 0.5 ** ((self._clock - clock) / self.half_life)


def make_policy(name: PolicyName, slots: int) -> EvictionPolicy:
    """The policy `name` for a pool of `slots` device slots."""
    if name == "lru":
        return LRUPolicy()
    if name == "lrfu":
        return LRFUPolicy(half_life=HALF_LIFE_PER_SLOT * slots)
    raise ValueError(f"unknown eviction policy {name!r}")
