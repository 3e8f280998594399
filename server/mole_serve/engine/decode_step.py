"""The decode step over persistent inputs: what a CUDA graph replays.

A decode-only step (every row one token) copies its inputs into buffers allocated once for the
largest bucket, then runs the forward on the bucket's leading rows. Rows past the batch are padding:
token 0 at position 0, writing the scratch KV block no sequence owns, with no adapter. Every LoRA
path the step needs runs over all the bucket's rows, a row outside a path having weight 0 (slot 0,
the zero slot, on the stacks; a false mask on a mixture of experts). Nothing inside the forward
then reads a host value but the step's `Signature` (bucket, the rank the stacks run at, whether a
gate runs, the MELoRA block shapes and MoE-kind adapters present): one signature, one trace.

On CUDA (`MOLE_CUDA_GRAPHS`) each (signature, pool version) is captured once as a graph and
replayed: the host then launches one graph per step instead of every op of every layer. The pool
version changes whenever a slot's weights do (a load, an eviction, the gate), and with it the
tensors a graph read; its graphs are dropped and recaptured on first use. Prefill and steps larger
than the largest bucket run eagerly (runner.py).

The layout of the buffers and the buckets is in docs/architecture.md ("The static decode step").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mole_serve.engine.kv_cache import AttentionMetadata, KVCache, block_slots
from mole_serve.lora.backends.base import LoRABackend
from mole_serve.lora.batch import BlockRows, LoRABatchInfo
from mole_serve.lora.context import LoRAContext
from mole_serve.lora.gate import EXTRA_COLUMNS, GateStats
from mole_serve.lora.moe import ExpertRows
from mole_serve.lora.pool import LoRAPool

log = logging.getLogger(__name__)

NativeChoice = tuple[tuple[int, int], int, float] | None  # (block shape, lora slot, weight): runner._native


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, and max_num_seqs itself (vLLM's capture sizes)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return [*sizes, max_num_seqs]


@dataclass(frozen=True)
class Signature:
    """What the step's trace depends on besides its buffers' contents."""

    bucket: int
    kv_width: int  # blocks of each row's table the CPU attention reads (0: the paged kernel reads them)
    rank: int  # what the slot stacks run at (0: no row has a set)
    columns: int  # K: the (slot, weight) pairs per row the stacks run over
    gated: bool
    block_shapes: tuple[tuple[int, int], ...]  # MELoRA rows' block shapes
    expert_slots: tuple[int, ...]  # MoE-kind adapters' lora slots


@dataclass
class StepRow:
    """One decode row as the runner chose its paths (runner.forward_logits)."""

    token: int
    position: int
    block_table: list[int]
    lora_slots: Sequence[int]  # its set on the slot stacks (empty: native blocks, experts or none)
    lora_weights: Sequence[float]
    gated: bool
    native: NativeChoice
    expert_slot: int | None


class HostDevice:
    """A buffer on the device and its host staging twin (pinned on CUDA, so the copy is async);
    the host side is filled through a numpy view."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.device = torch.zeros(shape, dtype=dtype, device=device)
        on_cpu = device.type == "cpu"
        self.host = self.device if on_cpu else torch.zeros(shape, dtype=dtype, pin_memory=True)
        # bfloat16 has no numpy dtype: its staging is filled as float32 and cast on the device
        self.np = (self.host if dtype != torch.bfloat16 else self.host.view(torch.int16)).numpy()
        self.bf16 = dtype == torch.bfloat16

    def fill(self, rows: slice, values: np.ndarray | Sequence) -> None:
        if self.bf16:  # round to nearest even into bfloat16's bits
            self.host[rows] = torch.as_tensor(np.asarray(values, dtype=np.float32)).to(torch.bfloat16)
        else:
            self.np[rows] = values

    def upload(self, rows: int) -> None:
        if self.host is not self.device:
            self.device[:rows].copy_(self.host[:rows], non_blocking=True)


@dataclass
class StepEntry:
    """One signature's forward inputs: views of the buffers at its bucket, and its LoRA context
    (rebuilt only with the signature or the pool version, so a graph's tensors stay put)."""

    signature: Signature
    version: int
    input_ids: torch.Tensor
    meta: AttentionMetadata
    rows: torch.Tensor  # [b] arange: every row's logits
    lora: LoRAContext | None
    logits: torch.Tensor | None = None  # the graph's output, on CUDA
    graph: torch.cuda.CUDAGraph | None = field(default=None, repr=False)


class StaticDecode:
    """Persistent decode inputs for up to `max_rows` rows, and the step over them."""

    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        kv: KVCache,
        pool: LoRAPool,
        backend: LoRABackend,
        max_rows: int,
        max_adapters: int,
        max_blocks: int,
        scratch_block: int,
        dtype: torch.dtype,
        device: torch.device,
        cuda_graphs: bool = False,
    ) -> None:
        """forward: the model's (ids, positions, kv, meta, sample_rows, lora) -> logits.
        max_blocks: the widest block table (max_model_len over the block size); scratch_block: a
        KV block no sequence owns, which padded rows write."""
        self.forward, self.kv, self.pool, self.backend = forward, kv, pool, backend
        self.buckets = bucket_sizes(max_rows)
        self.max_rows, self.max_adapters, self.max_blocks = max_rows, max_adapters, max_blocks
        self.scratch_block, self.dtype, self.device = scratch_block, dtype, device
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        B, K = max_rows, max_adapters

        def buf(*shape: int, dtype: torch.dtype = torch.long) -> HostDevice:
            return HostDevice(shape, dtype, device)

        self.input_ids, self.positions, self.slot_mapping = buf(B), buf(B), buf(B)
        self.block_tables, self.seq_lens = buf(B, max_blocks, dtype=torch.int32), buf(B, dtype=torch.int32)
        self.lora_slots, self.lora_weights = buf(B, K), buf(B, K, dtype=dtype)
        self.lora_ranks = buf(B, K, dtype=torch.int32)  # each column's slot's own rank (the Triton kernels')
        self.gated = buf(B, dtype=torch.bool)
        self.gate_sums = torch.zeros(B, K + EXTRA_COLUMNS, dtype=torch.float32, device=device)
        self.block_rows: dict[tuple[int, int], tuple[HostDevice, HostDevice]] = {}  # shape -> (slots, weights)
        self.expert_masks: dict[int, HostDevice] = {}  # lora slot -> [B] bool, its rows
        self.arange = torch.arange(B, device=device)
        self._entries: dict[Signature, StepEntry] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.decode_slots: tuple[tuple[int, ...], ...] = ()  # the step's rows' slots, padded (fill)
        self.steps = 0  # steps run here
        self.replays = 0  # of those, replayed as a graph

    def bucket(self, rows: int) -> int | None:
        """The smallest bucket holding `rows` (None: more than the largest; the step runs eagerly)."""
        return next((b for b in self.buckets if b >= rows), None)

    # --- filling the buffers ---
    def fill(self, rows: Sequence[StepRow]) -> Signature:
        """Copy the step's rows into the buffers (padding the rest of the bucket) and upload them."""
        n, bs = len(rows), self.kv.block_size
        b = self.bucket(n)
        assert b is not None  # the runner sends only steps that fit a bucket
        K, pad = self.max_adapters, slice(n, b)
        self.input_ids.fill(slice(0, n), [r.token for r in rows])
        self.positions.fill(slice(0, n), [r.position for r in rows])
        self.slot_mapping.fill(slice(0, n), [r.block_table[r.position // bs] * bs + r.position % bs for r in rows])
        self.seq_lens.fill(slice(0, n), [r.position + 1 for r in rows])
        tables = self.block_tables.np
        tables[:b] = self.scratch_block
        for i, r in enumerate(rows):
            tables[i, : len(r.block_table)] = r.block_table
        for target, pad_value in ((self.input_ids, 0), (self.positions, 0), (self.seq_lens, 1)):
            target.np[pad] = pad_value
        self.slot_mapping.np[pad] = self.scratch_block * bs
        slots = [list(r.lora_slots) + [0] * (K - len(r.lora_slots)) for r in rows]
        self.lora_slots.fill(slice(0, n), slots)
        self.lora_slots.np[pad] = 0
        self.lora_weights.fill(slice(0, n), [list(r.lora_weights) + [0.0] * (K - len(r.lora_weights)) for r in rows])
        self.lora_weights.fill(pad, np.zeros((b - n, K)))
        ranks = self.pool.slot_ranks
        self.lora_ranks.fill(slice(0, n), [[ranks[s] if s else 0 for s in row] for row in slots])
        self.lora_ranks.np[pad] = 0
        self.gated.fill(slice(0, n), [r.gated for r in rows])
        self.gated.np[pad] = False
        shapes = sorted({r.native[0] for r in rows if r.native is not None})
        for shape in shapes:
            block_slots_, block_weights = self._block_buffers(shape)
            chosen = [r.native if r.native is not None and r.native[0] == shape else None for r in rows]
            block_slots_.fill(slice(0, n), [c[1] if c else 0 for c in chosen])
            block_slots_.np[pad] = 0
            block_weights.fill(slice(0, n), [c[2] if c else 0.0 for c in chosen])
            block_weights.fill(pad, np.zeros(b - n))
        expert_slots = sorted({r.expert_slot for r in rows if r.expert_slot is not None})
        for slot in expert_slots:
            mask = self._expert_mask(slot)
            mask.fill(slice(0, n), [r.expert_slot == slot for r in rows])
            mask.np[pad] = False
        for buffer in self._buffers():
            buffer.upload(b)
        has_sets = any(r.lora_slots for r in rows)
        kv_width = 0
        if self.kv.decode_kernel is None:  # gather + SDPA reads this many blocks of each row's table
            kv_width = max(len(r.block_table) for r in rows)
        # On CUDA every step runs the stacks at their full rank (the kernels bound each column by its
        # slot's own rank), so adapters coming and going do not change the signature.
        if self.cuda_graphs:  # the kernels skip a slot of rank 0 and bound the others by theirs
            rank, columns = (self.pool.rank, K) if has_sets else (0, 0)
        else:  # the torch backend computes every column it is given, at one rank
            rank = max(max(r) for r in self.lora_ranks.np[:n]) if has_sets else 0
            columns = max(len(r.lora_slots) for r in rows)
            # the torch backend keeps a steady batch's gathered adapters (GatherCache) by them
            self.decode_slots = tuple(tuple(row[:columns]) for row in slots) + ((0,) * columns,) * (b - n)
        gated = any(r.gated for r in rows)
        return Signature(b, kv_width, int(rank), columns, gated, tuple(shapes), tuple(expert_slots))

    def _buffers(self) -> list[HostDevice]:
        fixed = [self.input_ids, self.positions, self.slot_mapping, self.block_tables, self.seq_lens]
        lora = [self.lora_slots, self.lora_weights, self.lora_ranks, self.gated]
        return fixed + lora + [t for pair in self.block_rows.values() for t in pair] + list(self.expert_masks.values())

    def _block_buffers(self, shape: tuple[int, int]) -> tuple[HostDevice, HostDevice]:
        if shape not in self.block_rows:
            self.block_rows[shape] = (
                HostDevice((self.max_rows,), torch.long, self.device),
                HostDevice((self.max_rows,), self.dtype, self.device),
            )
        return self.block_rows[shape]

    def _expert_mask(self, slot: int) -> HostDevice:
        if slot not in self.expert_masks:
            self.expert_masks[slot] = HostDevice((self.max_rows,), torch.bool, self.device)
        return self.expert_masks[slot]

    # --- the step ---
    def entry(self, sig: Signature) -> StepEntry:
        """The signature's inputs at the pool's current version (built on first use)."""
        entry = self._entries.get(sig)
        if entry is None or entry.version != self.pool.version:
            if entry is not None and entry.graph is not None:  # the pool changed: every graph read it
                self._drop_graphs()
            entry = self._entries[sig] = self._build(sig)
        return entry

    def _drop_graphs(self) -> None:
        stale = [s for s, e in self._entries.items() if e.version != self.pool.version]
        for s in stale:
            del self._entries[s]

    def _build(self, sig: Signature) -> StepEntry:
        b, rows = sig.bucket, slice(0, sig.bucket)
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping.device[rows],
            positions=self.positions.device[rows],
            num_decode=b,
            decode_slots=torch.empty(b, 0, dtype=torch.long, device=self.device),  # set in the step
            decode_mask=None,
            decode_block_tables=self.block_tables.device[rows],
            decode_seq_lens=self.seq_lens.device[rows],
            prefill=[],
        )
        return StepEntry(sig, self.pool.version, self.input_ids.device[rows], meta, self.arange[rows], self._lora(sig))

    def _lora(self, sig: Signature) -> LoRAContext | None:
        b, pool = sig.bucket, self.pool
        every_row = self.arange[:b]
        batch = stats = None
        if sig.rank:
            K = sig.columns
            batch = LoRABatchInfo(
                self.lora_slots.device[:b, :K],
                b,
                [],
                self.lora_weights.device[:b, :K],
                rank=sig.rank,
                decode_runs=((b, sig.rank),),
                row_ranks=self.lora_ranks.device[:b, :K],
            )
            if sig.gated:  # the sums: K weights, then the base column's share and the entropy
                stats = GateStats(self.gated.device[:b], every_row, self.gate_sums[:b, : K + EXTRA_COLUMNS], None)
        blocks = [
            BlockRows(shape, every_row, slots.device[:b], weights.device[:b], (0, b))
            for shape in sig.block_shapes
            for slots, weights in [self.block_rows[shape]]
        ]
        experts = [
            ExpertRows(
                pool.experts[slot], every_row, (0, b), every_row, list(range(b)), b, self.expert_masks[slot].device[:b]
            )
            for slot in sig.expert_slots
        ]
        if batch is None and not blocks and not experts:
            return None
        gates = pool.layer_gates if stats is not None else None
        return LoRAContext(pool.stacks, batch, self.backend, gates, stats, blocks, pool.block_stacks, experts)

    def step_forward(self, entry: StepEntry) -> torch.Tensor:
        """The traced step: logits [b, V] of every row, from the buffers alone."""
        meta, sig = entry.meta, entry.signature
        if sig.kv_width:  # CPU attention: each row's slots over its table's first kv_width blocks
            tables = meta.decode_block_tables[:, : sig.kv_width]
            meta.decode_slots = block_slots(tables, self.kv.block_size)  # [b, kv_width * block_size]
            width = meta.decode_slots.shape[1]
            keep = torch.arange(width, device=tables.device)[None, :] < meta.decode_seq_lens[:, None]
            meta.decode_mask = keep.view(sig.bucket, 1, 1, width)
        lora, pool = entry.lora, self.pool
        if lora is not None and lora.batch is not None:
            # the backend's per-step state is this step's (inside the trace: a graph rebuilds the
            # Triton segments from the buffers; a graph never reads the torch backend's gather
            # cache, which is keyed by host values)
            if not self.cuda_graphs:
                lora.batch.decode_slots = self.decode_slots
            self.backend.prepare(lora.batch, pool.version, pool.slot_bytes * min(sig.rank, pool.rank) // pool.rank)
            if lora.stats is not None:
                lora.stats.sums.zero_()
        return self.forward(entry.input_ids, meta.positions, self.kv, meta, entry.rows, entry.lora)

    def run(self, rows: Sequence[StepRow]) -> tuple[torch.Tensor, LoRAContext | None]:
        """The step's logits [n, V] (float32) and the LoRA context whose statistics it filled."""
        entry = self.entry(self.fill(rows))
        self.steps += 1
        if not self.cuda_graphs:
            self._clear_records(entry)
            return self.step_forward(entry)[: len(rows)], entry.lora
        if entry.graph is None:
            self._capture(entry)
        assert entry.graph is not None and entry.logits is not None
        entry.graph.replay()
        self.replays += 1
        return entry.logits[: len(rows)], entry.lora

    def _capture(self, entry: StepEntry) -> None:
        """Warm up on a side stream (lazy initializations, autotuning), then record the step."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._clear_records(entry)
                self.step_forward(entry)
        torch.cuda.current_stream().wait_stream(stream)
        self._clear_records(entry)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            entry.logits = self.step_forward(entry)
        entry.graph = graph

    @staticmethod
    def _clear_records(entry: StepEntry) -> None:
        """The routers' per-step records: a graph keeps those of its capture, which replays refill."""
        for experts in entry.lora.experts if entry.lora is not None else ():
            experts.routed.clear()

    def capture_base(self) -> None:
        """Capture the base model's step at every bucket (start-up; adapters' signatures are
        captured on first use), and log what it took."""
        if not self.cuda_graphs:
            return
        start = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device)
        padding = StepRow(0, 0, [self.scratch_block], (), (), False, None, None)
        for b in self.buckets:
            entry = self.entry(self.fill([padding] * b))
            if entry.graph is None:
                self._capture(entry)
        torch.cuda.synchronize(self.device)
        log.info(
            "captured decode CUDA graphs for batch sizes %s in %.1f s (%.0f MiB)",
            self.buckets,
            time.perf_counter() - start,
            (torch.cuda.memory_reserved(self.device) - before) / 2**20,
        )
