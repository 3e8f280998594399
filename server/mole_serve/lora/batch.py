"""LoRABatchInfo: which lora slots and prior weights each token of a step uses. Built once per
step by the runner; read by every adapted layer through the backend. A pure mapping: the gate's
statistics live in gate.GateStats, a backend's caches in the backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Dense path when the step's distinct adapters are shared by at least this many sequences each
# on average: its wasted FLOPs (every token against every unique slot) then cost less than
# gathering a copy of each sequence's adapters.
DENSE_MIN_SEQS_PER_ADAPTER = 4
# The rank of a slot in a batch built without the pool's slot ranks (tests of the op alone): every op
# bounds a rank by its stack's, so such a slot runs at the stacks' full rank. int32's largest: it
# fits the Triton kernels' rank tables.
UNKNOWN_RANK = 2**31 - 1


@dataclass
class LoRABatchInfo:
    lora_slots: torch.Tensor  # [N, K] lora slots per sequence, 0 (the all-zero slot) pads
    num_decode: int  # the first num_decode sequences have one token each
    prefill_spans: list[tuple[int, int]]  # (token offset, length) of the other sequences
    # Prior weights of each token over the path's columns: [T, K] on the gathered path (0 on
    # padding); [T, U] on the dense path, or None there when every weight is 1.
    token_weights: torch.Tensor | None
    unique_slots: torch.Tensor | None = None  # [U], set when the dense path is chosen
    unique_range: tuple[int, int] | None = None  # (s0, s1) when unique_slots == arange(s0, s1)
    seq_columns: list[list[int]] | None = None  # dense path: per sequence, its K slots' columns
    # gathered path: the decode rows' padded slots up to the last one with an adapter (the rows
    # after it have none and add nothing), what a backend may key a gather cache on
    decode_slots: tuple[tuple[int, ...], ...] | None = None
    # Ranks: what each slot holds (0 for the zero slot). Rows past a slot's own rank are zero, so an
    # op reads only the first `rank` rows of each module block, the largest of the slots it uses.
    rank: int = UNKNOWN_RANK  # the largest over every slot the step's rows use
    set_ranks: list[list[int]] = field(default_factory=list)  # [N][K]: beside lora_slots
    unique_ranks: list[int] | None = None  # [U]: beside unique_slots (dense path)
    # gathered path: the decode rows 0..num_decode_with_sets as runs of one rank, (end row, rank)
    decode_runs: tuple[tuple[int, int], ...] = ()
    # a static decode step (engine/decode_step.py): [N, K] int32 on the device, each column's slot's own
    # rank; every row is then its own segment, so nothing about the rows is read on the host
    row_ranks: torch.Tensor | None = None

    @property
    def num_decode_with_sets(self) -> int:
        """Gathered path: the decode rows the op must compute (0..this); the rest have no adapter."""
        return len(self.decode_slots) if self.decode_slots is not None else self.num_decode

    @property
    def num_columns(self) -> int:
        """Width of the per-token weights: U unique slots (dense) or K per sequence (gathered)."""
        return len(self.unique_slots) if self.unique_slots is not None else self.lora_slots.shape[1]


def row_starts(num_tokens: Sequence[int]) -> list[int]:
    """The first row of each sequence in the step's flattened tokens, then the total."""
    starts = [0]
    for n in num_tokens:
        starts.append(starts[-1] + n)
    return starts


def as_range(ids: Sequence[int]) -> tuple[int, int] | None:
    """(i0, i1) when ids == range(i0, i1) (ascending, no gaps): slice with it instead of gathering."""
    return (ids[0], ids[-1] + 1) if list(ids) == list(range(ids[0], ids[-1] + 1)) else None


def rank_runs(ranks: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(end, rank) of each run of consecutive rows at one rank. A row of rank 0 (no adapter: it reads
    the zero slot, zero at any rank) joins the run before it, or the one after when it leads."""
    runs: list[tuple[int, int]] = []
    for i, r in enumerate(ranks):
        if runs and r in (0, runs[-1][1]):
            runs[-1] = (i + 1, runs[-1][1])
        elif runs and runs[-1][1] == 0:
            runs[-1] = (i + 1, r)
        else:
            runs.append((i + 1, r))
    return tuple(runs)


def take_rows(t: torch.Tensor, rows: torch.Tensor, row_range: tuple[int, int] | None) -> torch.Tensor:
    """t[rows]: a view when the rows are a range, else a gathered copy."""
    return t[row_range[0] : row_range[1]] if row_range else t.index_select(0, rows)


@dataclass
class BlockRows:
    """Token rows that run one adapter's native block form (MELoRA's n mini LoRAs) instead of the
    dense slot stacks: a sequence whose set is one such adapter, not gated. One per block shape."""

    shape: tuple[int, int]  # (n blocks, rank of each)
    rows: torch.Tensor  # [Tb] token rows of the step
    slots: torch.Tensor  # [Tb] lora slot of each row
    weights: torch.Tensor  # [Tb] the adapter's prior weight for each row
    row_range: tuple[int, int] | None = None  # (r0, r1) when rows == arange(r0, r1): slices, not gathers


def build_block_rows(
    seqs: Sequence[tuple[tuple[int, int], int, float] | None],
    num_tokens: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
) -> list[BlockRows]:
    """seqs[i] = (block shape, lora slot, weight) of sequence i, or None when it runs dense."""
    starts = row_starts(num_tokens)
    groups: dict[tuple[int, int], tuple[list[int], list[int], list[float]]] = {}
    for i, native in enumerate(seqs):
        if native is not None:
            shape, slot, weight = native
            rows, slots, weights = groups.setdefault(shape, ([], [], []))
            rows += range(starts[i], starts[i + 1])
            slots += [slot] * num_tokens[i]
            weights += [weight] * num_tokens[i]
    return [
        BlockRows(
            shape,
            torch.tensor(r, device=device),
            torch.tensor(s, device=device),
            torch.tensor(w, dtype=dtype, device=device),
            as_range(r),
        )
        for shape, (r, s, w) in groups.items()
    ]


def build_lora_batch(
    sets: Sequence[tuple[Sequence[int], Sequence[float]]],
    num_tokens: Sequence[int],
    num_decode: int,
    device: torch.device,
    dtype: torch.dtype,
    force_dense: bool = False,
    slot_ranks: Sequence[int] | None = None,
) -> LoRABatchInfo | None:
    """sets[i] = (lora slots, prior weights) of sequence i in step order; num_tokens[i] its tokens
    this step. None when no sequence uses an adapter: the step then runs the bare base model.
    force_dense: the dense path whatever the mix (gate training: a few adapters, long sequences).
    slot_ranks[s]: the rank slot s holds (the pool's); None: unknown (UNKNOWN_RANK)."""
    if not any(slots for slots, _ in sets):
        return None
    K = max(len(slots) for slots, _ in sets)
    counts = torch.tensor(list(num_tokens))
    padded = [tuple(s) + (0,) * (K - len(s)) for s, _ in sets]
    spans, offset = [], num_decode
    for n in num_tokens[num_decode:]:
        spans.append((offset, n))
        offset += n

    def rank_of(slot: int) -> int:
        return 0 if slot == 0 else UNKNOWN_RANK if slot_ranks is None else slot_ranks[slot]

    set_ranks = [[rank_of(s) for s in slots] for slots in padded]
    info = LoRABatchInfo(
        torch.tensor(padded, dtype=torch.long).to(device),
        num_decode,
        spans,
        None,
        rank=max(map(max, set_ranks)),
        set_ranks=set_ranks,
    )

    unique = sorted({s for slots, _ in sets for s in slots if s != 0})
    if force_dense or len(unique) * DENSE_MIN_SEQS_PER_ADAPTER <= len(sets):
        column = {s: u for u, s in enumerate(unique)}
        rows = [[0.0] * len(unique) for _ in sets]  # [N, U]
        for row, (slots, weights) in zip(rows, sets):
            for s, w in zip(slots, weights):
                if s != 0:
                    row[column[s]] += w
        info.unique_slots = torch.tensor(unique, dtype=torch.long, device=device)
        info.unique_range = as_range(unique)
        info.unique_ranks = [rank_of(s) for s in unique]
        if any(w != 1 for row in rows for w in row):  # else: one adapter per sequence at weight 1
            info.token_weights = torch.tensor(rows, dtype=dtype).repeat_interleave(counts, dim=0).to(device)
        info.seq_columns = [[column[s] for s in slots] for slots, _ in sets]
    else:
        seq_weights = torch.tensor([list(w) + [0.0] * (K - len(w)) for _, w in sets], dtype=dtype)  # [N, K]
        info.token_weights = seq_weights.repeat_interleave(counts, dim=0).to(device)
        rows_with_sets = max((i + 1 for i in range(num_decode) if sets[i][0]), default=0)  # to the last with a set
        info.decode_slots = tuple(padded[:rows_with_sets])
        info.decode_runs = rank_runs([max(r) for r in set_ranks[:rows_with_sets]])
    return info
