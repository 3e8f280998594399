"""The host-memory tier behind the device slots: parsed adapters, so that reloading an evicted
adapter is a copy to the device, not a read of its files (the pool's `load` can always read any
adapter again).

It stays LRU rather than taking the slots' eviction policy: it is asked only when the slots miss
(a load) or a merge reads its sources, not on every request, so counts here would count the slots'
misses, not the adapters' popularity.
"""

from __future__ import annotations

from collections import OrderedDict

from mole_serve.lora.kinds.base import AdapterWeights, pinned


class CPUTier:
    def __init__(self, capacity: int, pin: bool) -> None:
        self.capacity = capacity
        self.pin = pin  # keep the tensors in page-locked memory: copies to a CUDA device are then asynchronous
        self._entries: OrderedDict[str, AdapterWeights] = OrderedDict()  # least recently used first

    def get(self, name: str) -> AdapterWeights | None:
        weights = self._entries.get(name)
        if weights is not None:
            self._entries.move_to_end(name)
        return weights

    def put(self, name: str, weights: AdapterWeights) -> AdapterWeights:
        """Keep `weights` (pinned if the tier pins) as the most recent; returns what is kept."""
        if self.pin:
            weights = pinned(weights)
        self._entries[name] = weights
        self._entries.move_to_end(name)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return weights

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)

    def values(self) -> list[AdapterWeights]:
        """What the tier holds, least recently used first."""
        return list(self._entries.values())
