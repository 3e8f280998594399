"""Residency: which adapters sit in device slots (the stacks), a CPU tier behind them, and
whatever `load` reads behind that (the library's catalog: the disk). Packing an adapter into a
slot is its kind's job; which adapters exist is the catalog's.

LoRAPool is the facade the engine and the runner use. It keeps the names and what each kind
needs resident beside the stacks (MELoRA block stacks, MoE experts and routers, the gate's keys)
and leaves the rest to three parts: which slots are free, held and pinned (lora/slots.py), which
adapter is evicted first (lora/eviction.py, Settings.eviction_policy), and the host-memory copies
(lora/cpu_tier.py).

Slot 0 is all zeros (a sequence without adapters points there). Every slot is stored padded to the
stacks' rank (zero rows are exact), and that rank follows what the slots hold: the stacks grow
when a larger adapter arrives and shrink back when the last adapter of the largest rank leaves
(evicted, replaced or deleted, once no running sequence pins it), re-allocated at the largest rank
still held. One rank for all slots, rather than per-rank buckets, keeps every backend's op one
gather over one stack per group; the price is a copy of the stacks whenever the largest held rank
changes (the held adapters' rows move over as they are: no re-read, no re-pack). Compute is not
padded: `slot_ranks` says what rank each slot holds, and an op reads only the first rows of each
module block, up to the largest rank among the slots it uses (backends/base.py). Either change
bumps the version, so backends' caches drop; a shrink hands the freed memory back to the system
(CUDA's cache emptied, glibc's heap trimmed); block stacks of a MELoRA block shape no slot holds
are freed too.
A slot in use by a running sequence is pinned and never evicted. A mixture of LoRA experts
(MixLoRA, MoELoRA) takes 1 + E slots: its own (the shared LoRAs; what sequences pin) and one per
expert, all evicted together; its routers sit beside them (`experts`).
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from mole_serve.lora.cpu_tier import CPUTier
from mole_serve.lora.eviction import PolicyName, make_policy
from mole_serve.lora.gate import PROBE_GROUP, LayerGate, MoLEGate
from mole_serve.lora.kinds import KINDS
from mole_serve.lora.kinds.base import AdapterWeights, LoRATargetSpec, held_rank
from mole_serve.lora.kinds.lora import pack as pack_lora
from mole_serve.lora.moe import ResidentExperts
from mole_serve.lora.slots import SlotAllocator
from mole_serve.lora.stacks import LayerStacks, copy_slots, new_layer_stacks, slot_bytes

# glibc's malloc_trim: freed CPU tensors of the stack sizes mostly stay in malloc's heap (its mmap
# threshold rises with the sizes freed), so the RSS a shrink frees only drops once it is trimmed.
# None where the C library has no such call (musl, macOS).
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)


def _return_freed_memory(device: torch.device) -> None:
    """Memory just freed goes back to the system, not only to an allocator's cache."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif _malloc_trim is not None:
        _malloc_trim(0)


class LoRAPool:
    def __init__(
        self,
        spec: LoRATargetSpec,
        max_loras: int,
        max_cpu_loras: int,
        device: torch.device,
        dtype: torch.dtype,
        load: Callable[[str], AdapterWeights],
        eviction_policy: PolicyName = "lru",
    ) -> None:
        self.spec, self.max_loras, self.max_cpu_loras = spec, max_loras, max_cpu_loras
        self.device, self.dtype = device, dtype
        self.load = load  # name -> weights, for adapters in neither tier (raises if it does not exist)
        self.rank = 0
        self.stacks: list[LayerStacks] = []  # [layer][group], empty until the first load
        self.version = 0  # bumped whenever any slot's weights change: backends' caches key on it
        self.slot_bytes = 0  # one slot's A and B over all layers and groups (padded to the pool's rank)
        self.policy = make_policy(eviction_policy, max_loras)
        self._slots = SlotAllocator(max_loras)
        self._cpu = CPUTier(max_cpu_loras, pin=device.type == "cuda")
        self._resident: dict[str, int] = {}  # name -> its primary lora slot
        # primary slot -> the rank of the adapter packed there, until its slots are freed (a replaced
        # adapter's stay held while pinned): the stacks' rank is the largest of these
        self._ranks: dict[int, int] = {}
        # slot -> the rank of what it holds (an adapter's own LoRAs, or one of its experts): the rows
        # an op reads of it. A free slot's entry is stale: no step reads a free slot.
        self.slot_ranks = [0] * (max_loras + 1)
        self.loads = 0
        self.evictions = 0
        self.gate: MoLEGate | None = None
        self.layer_gates: list[LayerGate] | None = None  # the gate with every slot's keys, per layer
        self._virtual: OrderedDict[str, AdapterWeights] = OrderedDict()  # built in memory (merges)
        # Native block forms (MELoRA) beside the dense stacks, per block shape (n, r): per layer,
        # module -> (A [slots, n, r, d_in/n], B [slots, n, d_out/n, r]); 1/n of the dense bytes.
        self.block_stacks: dict[tuple[int, int], list[dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.block_shape: dict[int, tuple[int, int]] = {}  # lora slot -> its adapter's block shape
        self.experts: dict[int, ResidentExperts] = {}  # lora slot of a MoE-kind adapter -> its experts

    # --- what the pool holds ---
    def put(self, weights: AdapterWeights) -> None:
        """A new version of an adapter (just validated): drop any stale copy, keep it in the CPU tier."""
        self.forget(weights.name)
        self._cpu.put(weights.name, weights)

    def forget(self, name: str) -> None:
        """Drop cached copies of an adapter (replaced or deleted). A pinned slot stays valid until
        the sequences running on the old weights release it."""
        self._cpu.drop(name)
        self._virtual.pop(name, None)
        if name in self._resident:
            self._vacate(name)
            self._fit_storage()

    def put_virtual(self, weights: AdapterWeights, max_kept: int) -> None:
        """An adapter built in memory (a static merge); the `max_kept` most recent stay known."""
        self._virtual[weights.name] = weights
        self._virtual.move_to_end(weights.name)
        while len(self._virtual) > max_kept:
            self.forget(next(iter(self._virtual)))

    def has_virtual(self, name: str) -> bool:
        return name in self._virtual

    def attach_gate(self, gate: MoLEGate) -> None:
        self.gate = gate.to(self.device)  # fp32 parameters; layer_gates casts to the stacks' dtype
        self._refresh_gate_keys()

    def weights(self, name: str) -> AdapterWeights:
        if name in self._virtual:
            return self._virtual[name]
        cached = self._cpu.get(name)
        return cached if cached is not None else self._cpu.put(name, self.load(name))

    def is_resident(self, name: str) -> bool:
        return name in self._resident

    @property
    def num_resident(self) -> int:
        return len(self._resident)

    # --- residency ---
    def acquire(self, names: Sequence[str]) -> list[int] | None:
        """Make `names` resident and pin their slots. None (and nothing pinned) if the slots they
        need are all pinned by running sequences."""
        missing = [n for n in dict.fromkeys(names) if n not in self._resident]
        evictable = self.policy.victims(
            n for n, slot in self._resident.items() if not self._slots.pinned(slot) and n not in names
        )
        needed = {n: self.footprint(self.weights(n)) for n in missing}
        reclaimable = sum(len(self._slots.held(self._resident[n])) for n in evictable)
        if sum(needed.values()) > self._slots.num_free + reclaimable:
            return None
        for name in missing:
            slots = self._cheapest_run(needed[name], evictable) if needed[name] > 1 else None
            if slots is None:
                while self._slots.num_free < needed[name]:
                    self._evict(evictable.pop(0))
                slots = self._slots.take(needed[name])
            self._load_into(slots, name)
        if missing:  # room was made by evicting: perhaps the largest adapter
            self._fit_storage()
        slots = []
        for name in names:
            self.policy.touch(name)
            slot = self._resident[name]
            self._slots.pin(slot)
            slots.append(slot)
        return slots

    def release(self, slots: Sequence[int]) -> None:
        freed = False
        for slot in slots:
            if self._slots.unpin(slot):  # its adapter was replaced or deleted while it ran
                self._slots_freed(slot)
                freed = True
        if freed:
            self._fit_storage()

    def _evict(self, name: str) -> None:
        self._vacate(name)
        self.evictions += 1

    def _vacate(self, name: str) -> None:
        """name leaves the slots; pinned, they are freed when the sequences running on it release them."""
        slot = self._resident.pop(name)
        self.policy.forget(name)
        if self._slots.give_back(slot):
            self._slots_freed(slot)

    def _slots_freed(self, slot: int) -> None:
        """The adapter at primary `slot` is gone from the stacks: what the pool kept for it goes too."""
        self.experts.pop(slot, None)
        self.block_shape.pop(slot, None)
        self._ranks.pop(slot, None)

    def _fit_storage(self) -> None:
        """Storage follows what the slots hold: the stacks shrink to the largest rank held (no
        stacks when none is), and a block shape no slot holds gives its block stacks back."""
        rank = max(self._ranks.values(), default=0)
        if rank < self.rank:
            self._resize(rank)
        for shape in set(self.block_stacks) - set(self.block_shape.values()):
            del self.block_stacks[shape]

    def _cheapest_run(self, n: int, evictable: list[str]) -> list[int] | None:
        """n consecutive slots for a MoE adapter (1 + E: its expert slots are then views of the
        stacks; scattered, they are a gather in every layer of every step): the allocator's run of
        free and evictable slots that evicts the fewest adapters; they are evicted and the run
        taken. None when pinned slots leave no such run."""
        found = self._slots.cheapest_run(n, [self._resident[name] for name in evictable])
        if found is None:
            return None
        run, displaced = found
        by_slot = {self._resident[name]: name for name in evictable}
        for slot in displaced:
            evictable.remove(by_slot[slot])
            self._evict(by_slot[slot])
        self._slots.claim(run)
        return run

    @staticmethod
    def footprint(weights: AdapterWeights) -> int:
        """Slots an adapter takes: 1, or 1 + E for a mixture of LoRA experts."""
        return 1 + (weights.moe.num_experts if weights.moe else 0)

    # --- what each kind keeps resident ---
    def _load_into(self, slots: list[int], name: str) -> None:
        """slots: the adapter's own, then its experts' (footprint)."""
        weights = self.weights(name)
        slot = slots[0]
        if weights.rank > self.rank:
            self._resize(weights.rank)
        self.version += 1
        self._ranks[slot] = weights.rank
        kind = KINDS[weights.kind]
        if weights.blocks:
            self._pack_blocks(weights, slot)
        if weights.moe:
            self.experts[slot] = ResidentExperts.build(weights, slot, slots[1:], self.spec.num_layers, self.device)
        experts = [weights.moe.expert(e, name) for e in range(len(slots) - 1)] if weights.moe else []
        self.slot_ranks[slot] = held_rank(weights.modules)  # what kind.pack writes: for every kind, its modules
        for expert, expert_slot in zip(experts, slots[1:]):
            self.slot_ranks[expert_slot] = expert.rank
        for layer, groups in enumerate(self.stacks):
            kind.pack(weights, groups, layer, slot, self.rank)
            for expert, expert_slot in zip(experts, slots[1:]):
                pack_lora(expert, groups, layer, expert_slot, self.rank)
            if self.layer_gates is not None and self.gate is not None:
                with torch.no_grad():
                    keys = self.gate.slot_keys(layer, groups[PROBE_GROUP], slice(slot, slot + 1))
                self.layer_gates[layer].keys[slot] = keys[0]
        self._resident[name] = slot
        self.loads += 1

    def _pack_blocks(self, weights: AdapterWeights, slot: int) -> None:
        """The adapter's native blocks into its shape's block stacks (allocated on first use)."""
        blocks = weights.blocks
        assert blocks is not None  # the caller packs blocks only for an adapter that has them
        A0 = next(iter(blocks.values()))[0]
        shape = (A0.shape[0], A0.shape[1])  # (n, r)
        n, r = shape
        if shape not in self.block_stacks:
            slots = self.max_loras + 1
            self.block_stacks[shape] = [
                {
                    m: (
                        torch.zeros(slots, n, r, d_in // n, dtype=self.dtype, device=self.device),
                        torch.zeros(slots, n, d_out // n, r, dtype=self.dtype, device=self.device),
                    )
                    for m, (d_in, d_out) in self.spec.shapes.items()
                    if d_in % n == 0 and d_out % n == 0
                }
                for _ in range(self.spec.num_layers)
            ]
        for layer, modules in enumerate(self.block_stacks[shape]):
            for module, (A, B) in modules.items():
                A[slot].zero_()
                B[slot].zero_()
                if (layer, module) in blocks:
                    a, b = blocks[(layer, module)]
                    A[slot].copy_(a, non_blocking=True)
                    B[slot].copy_(b, non_blocking=True)
        self.block_shape[slot] = shape

    def _resize(self, rank: int) -> None:
        """Re-allocate every stack at `rank` (at least every held adapter's; 0: no stacks), keeping
        the held adapters in place."""
        old, shrinking = self.stacks, rank < self.rank
        self.rank = rank
        self.stacks = [
            new_layer_stacks(self.spec, self.max_loras + 1, rank, self.dtype, self.device)
            for _ in range(self.spec.num_layers if rank else 0)
        ]
        self.version += 1
        self.slot_bytes = slot_bytes(self.stacks)
        for src, dst in zip(old, self.stacks):
            copy_slots(src, dst)
        del old
        self._refresh_gate_keys()
        if shrinking:
            _return_freed_memory(self.device)

    @torch.no_grad()
    def _refresh_gate_keys(self) -> None:
        """Every slot's M_i for the gate (once per attach or resize; loads update one slot). New
        tensors: what read the old ones (a captured decode graph) must see the version change."""
        if self.gate is not None:
            self.layer_gates = self.gate.layer_gates(self.stacks) if self.stacks else None
            self.version += 1
