"""Resident adapter slots: stacked A/B per (layer, module group) on the device, an LRU CPU tier
behind them, and the disk behind that.

Slot 0 is all zeros (a sequence without adapters points there). Stacks are padded to the
largest rank resident so far (zero rows are exact) and grow when a larger adapter arrives.
A slot in use by a running sequence is pinned and never evicted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from server.lora.formats import MODULE_GROUPS, LoRATargetSpec, LoRAWeights, load_peft_dir
from server.lora.gate import PROBE_GROUP, LayerGate, MoLEGate
from server.lora.ops import GatherCache, GroupStack


class LoRAPool:
    def __init__(
        self,
        spec: LoRATargetSpec,
        max_loras: int,
        max_cpu_loras: int,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
        gather_cache_bytes: int = 0,
    ) -> None:
        self.spec, self.max_loras, self.max_cpu_loras, self.max_rank = spec, max_loras, max_cpu_loras, max_rank
        self.device, self.dtype = device, dtype
        self.rank = 0
        self.stacks: list[dict[str, GroupStack]] = []  # [layer][group], empty until the first load
        self._paths: dict[str, Path] = {}
        self._cpu: OrderedDict[str, LoRAWeights] = OrderedDict()  # LRU, most recent last
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, LRU
        self._pins: Counter[int] = Counter()  # slot -> running sequences using it
        self._retired: set[int] = set()  # pinned slots of replaced/deleted adapters, freed on release
        self._free = list(range(max_loras, 0, -1))
        self.loads = 0
        self.evictions = 0
        self.gate: MoLEGate | None = None
        self.layer_gates: list[LayerGate] | None = None  # the gate with every slot's keys, per layer
        self._virtual: OrderedDict[str, LoRAWeights] = OrderedDict()  # built in memory (merges), no folder
        self.gather_cache = GatherCache(gather_cache_bytes)  # cleared whenever a slot's weights change

    # --- the library ---
    def register(self, name: str, path: Path, weights: LoRAWeights | None = None) -> LoRAWeights:
        """Validate an adapter folder now (errors surface here, not mid-step) and remember it;
        `weights` already parsed from that folder's files (an upload) skips reading it again."""
        weights = weights or load_peft_dir(path, self.spec, self.max_rank, name=name)
        self._paths[name] = Path(path)
        self._drop(name)
        self._remember(name, weights)
        return weights

    def register_weights(self, weights: LoRAWeights, max_kept: int) -> None:
        """An adapter built in memory (a static merge); the `max_kept` most recent stay known."""
        self._virtual[weights.name] = weights
        self._virtual.move_to_end(weights.name)
        while len(self._virtual) > max_kept:
            self.unregister(next(iter(self._virtual)))

    def attach_gate(self, gate: MoLEGate) -> None:
        self.gate = gate
        self._refresh_gate_keys()

    def unregister(self, name: str) -> None:
        """Forget an adapter: new requests can't use it; sequences running on it finish first."""
        self._paths.pop(name, None)
        self._virtual.pop(name, None)
        self._drop(name)

    def __contains__(self, name: str) -> bool:
        return name in self._paths or name in self._virtual

    @property
    def names(self) -> list[str]:
        return sorted(self._paths)

    @property
    def num_resident(self) -> int:
        return len(self._resident)

    @property
    def slot_bytes(self) -> int:
        """One slot's A and B over all layers and groups (padded to the pool's rank)."""
        return sum(g.A[0].numel() * g.A.element_size() + sum(B[0].numel() * B.element_size() for B in g.B)
                   for groups in self.stacks for g in groups.values())

    # --- residency ---
    def acquire(self, names: Sequence[str]) -> list[int] | None:
        """Make `names` resident and pin their slots. None (and nothing pinned) if the slots they
        need are all pinned by running sequences."""
        missing = [n for n in dict.fromkeys(names) if n not in self._resident]
        evictable = [n for n, slot in self._resident.items() if self._pins[slot] == 0 and n not in names]
        if len(missing) > len(self._free) + len(evictable):
            return None
        for name in missing:
            if not self._free:
                victim = evictable.pop(0)
                self._free.append(self._resident.pop(victim))
                self.evictions += 1
            self._load_into(self._free.pop(), name)
        slots = []
        for name in names:
            self._resident.move_to_end(name)
            slot = self._resident[name]
            self._pins[slot] += 1
            slots.append(slot)
        return slots

    def release(self, slots: Sequence[int]) -> None:
        for slot in slots:
            self._pins[slot] -= 1
            if self._pins[slot] <= 0:
                del self._pins[slot]
                if slot in self._retired:  # its adapter was replaced or deleted while it ran
                    self._retired.remove(slot)
                    self._free.append(slot)

    # --- internals ---
    def _remember(self, name: str, weights: LoRAWeights) -> None:
        self._cpu[name] = weights
        self._cpu.move_to_end(name)
        while len(self._cpu) > self.max_cpu_loras:  # every entry has a folder behind it to re-read
            self._cpu.popitem(last=False)

    def _drop(self, name: str) -> None:
        """Forget cached copies, so a replaced adapter is re-read. A pinned slot stays valid until
        the sequences running on the old weights release it."""
        self._cpu.pop(name, None)
        if name in self._resident:
            slot = self._resident.pop(name)
            if self._pins[slot]:
                self._retired.add(slot)
            else:
                self._free.append(slot)

    def weights(self, name: str) -> LoRAWeights:
        if name in self._virtual:
            return self._virtual[name]
        if name in self._cpu:
            self._cpu.move_to_end(name)
            return self._cpu[name]
        if name not in self._paths:
            raise KeyError(f"unknown adapter {name!r}")
        weights = load_peft_dir(self._paths[name], self.spec, self.max_rank, name=name)
        self._remember(name, weights)
        return weights

    def _load_into(self, slot: int, name: str) -> None:
        weights = self.weights(name)
        if weights.rank > self.rank:
            self._grow(weights.rank)
        self.gather_cache.clear()
        for layer, groups in enumerate(self.stacks):
            for group, modules in MODULE_GROUPS.items():
                stack = groups[group]
                stack.A[slot].zero_()
                for j, module in enumerate(modules):
                    stack.B[j][slot].zero_()
                    if (layer, module) in weights.modules:
                        A, B = weights.modules[(layer, module)]  # [r, d_in], [d_out, r]
                        r = A.shape[0]
                        stack.A[slot, j * self.rank : j * self.rank + r] = A
                        stack.B[j][slot, :r] = B.t()
            if self.layer_gates is not None:
                with torch.no_grad():
                    keys = self.gate.slot_keys(layer, groups[PROBE_GROUP], slice(slot, slot + 1))
                self.layer_gates[layer].keys[slot] = keys[0]
        self._resident[name] = slot
        self.loads += 1

    def _grow(self, rank: int) -> None:
        """Re-allocate every stack at a larger rank, keeping resident adapters in place."""
        old_rank, old = self.rank, self.stacks
        self.rank = rank
        self.stacks = [self._new_group_stacks() for _ in range(self.spec.num_layers)]
        self.gather_cache.clear()
        self.gather_cache.slot_bytes = self.slot_bytes
        if not old:
            self._refresh_gate_keys()
            return
        for layer, groups in enumerate(old):
            for group, modules in MODULE_GROUPS.items():
                src, dst = groups[group], self.stacks[layer][group]
                for j in range(len(modules)):
                    dst.A[:, j * rank : j * rank + old_rank] = src.A[:, j * old_rank : (j + 1) * old_rank]
                    dst.B[j][:, :old_rank] = src.B[j]
        self._refresh_gate_keys()

    @torch.no_grad()
    def _refresh_gate_keys(self) -> None:
        """Every slot's M_i for the gate (once per attach or rank growth; loads update one slot)."""
        if self.gate is not None and self.stacks:
            self.layer_gates = self.gate.layer_gates(self.stacks)

    def _new_group_stacks(self) -> dict[str, GroupStack]:
        slots, r = self.max_loras + 1, self.rank
        groups = {}
        for group, modules in MODULE_GROUPS.items():
            d_in = self.spec.shapes[modules[0]][0]
            outs = [self.spec.shapes[m][1] for m in modules]
            columns, c = [], 0
            for d_out in outs:
                columns.append((c, c + d_out))
                c += d_out
            groups[group] = GroupStack(
                A=torch.zeros(slots, len(modules) * r, d_in, dtype=self.dtype, device=self.device),
                B=[torch.zeros(slots, r, d_out, dtype=self.dtype, device=self.device) for d_out in outs],
                out_columns=columns,
            )
        return groups
