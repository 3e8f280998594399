"""Slot allocation for the pool's stacks: which of slots 1..n are free, which adapter holds which,
and which are pinned by running sequences. Slot 0 is the stacks' zero slot, never handed out.

An adapter is known here by its primary slot (the one sequences point at and pin). A mixture of
LoRA experts holds 1 + E slots, its primary and its experts', taken and given back together; taken
as one run of consecutive slots where possible (`cheapest_run`), so its experts read as a view of
the stacks instead of a gather. Names, and which adapter to evict, are the pool's and its policy's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


class SlotAllocator:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots, 0, -1))  # a stack: slot 1 first, then the last given back
        self._held: dict[int, list[int]] = {}  # primary slot -> its adapter's slots, primary first
        self._pins: Counter[int] = Counter()  # primary slot -> running sequences using it
        self._retired: set[int] = set()  # pinned primaries of replaced/deleted adapters, given back on release

    @property
    def num_free(self) -> int:
        return len(self._free)

    def held(self, primary: int) -> list[int]:
        """The slots of the adapter at `primary`: its own, then its experts'."""
        return self._held[primary]

    def pinned(self, primary: int) -> bool:
        return self._pins[primary] > 0

    def take(self, n: int) -> list[int]:
        """n free slots for one adapter (the caller made room), ascending: the first is its primary."""
        slots = sorted(self._free.pop() for _ in range(n))
        self._held[slots[0]] = slots
        return slots

    def cheapest_run(self, n: int, evictable: Sequence[int]) -> tuple[list[int], list[int]] | None:
        """n consecutive slots, each free or held by an adapter whose primary is in `evictable`: the
        run that displaces the fewest adapters, lowest first, and the primaries it displaces (in
        `evictable`'s order). None when pinned slots leave no such run. Nothing changes here: the
        caller gives the displaced back, then `claim`s the run."""
        owner = {slot: primary for primary in evictable for slot in self._held[primary]}
        free = set(self._free)
        best: tuple[list[int], set[int]] | None = None
        for start in range(1, self.num_slots - n + 2):
            run = list(range(start, start + n))
            if all(slot in free or slot in owner for slot in run):
                displaced = {owner[slot] for slot in run if slot not in free}
                if best is None or len(displaced) < len(best[1]):
                    best = (run, displaced)
        if best is None:
            return None
        return best[0], [primary for primary in evictable if primary in best[1]]

    def claim(self, run: list[int]) -> None:
        """`run`, all free, for one adapter: its first slot is the primary."""
        taken = set(run)
        self._free = [slot for slot in self._free if slot not in taken]
        self._held[run[0]] = run

    def give_back(self, primary: int) -> bool:
        """The adapter at `primary` leaves (evicted, replaced or deleted): its slots are free again,
        True. Pinned, they stay valid for the sequences running on them and are freed by the last
        `unpin`: False."""
        if self._pins[primary]:
            self._retired.add(primary)
            return False
        self._free_held(primary)
        return True

    def pin(self, primary: int) -> None:
        self._pins[primary] += 1

    def unpin(self, primary: int) -> bool:
        """One running sequence is done with `primary`. True when that freed a retired adapter's slots."""
        self._pins[primary] -= 1
        if self._pins[primary] > 0:
            return False
        del self._pins[primary]
        if primary not in self._retired:
            return False
        self._retired.remove(primary)
        self._free_held(primary)
        return True

    def _free_held(self, primary: int) -> None:
        slots = self._held.pop(primary)
        self._free += [*slots[1:], primary]  # the primary on top: the next single slot taken
