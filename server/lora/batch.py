"""LoRABatchInfo: which pool slots and weights each token of a step uses. Built once per step,
read by every adapted layer (ops.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from server.lora.ops import GatherCache

# Dense path when the step's distinct adapters are shared by at least this many sequences each
# on average: its wasted FLOPs (every token against every unique slot) then cost less than
# gathering a copy of each sequence's adapters.
DENSE_MIN_SEQS_PER_ADAPTER = 4


@dataclass
class LoRABatchInfo:
    seq_slots: torch.Tensor  # [N, K] pool slots per sequence, 0 (the all-zero slot) pads
    num_decode: int  # the first num_decode sequences have one token each
    prefill_spans: list[tuple[int, int]]  # (token offset, length) of the other sequences
    # Prior weights of each token over the path's columns: [T, K] on the gathered path (0 on
    # padding); [T, U] on the dense path, or None there when every weight is 1.
    token_weights: torch.Tensor | None
    unique_slots: torch.Tensor | None = None  # [U], set when the dense path is chosen
    unique_range: tuple[int, int] | None = None  # (s0, s1) when unique_slots == arange(s0, s1)
    # Set when some sequence's weights come from the gate:
    gated: torch.Tensor | None = None  # [T] bool, tokens whose weights the gate computes
    token_seq: torch.Tensor | None = None  # [T] sequence index of each token
    gate_sums: torch.Tensor | None = None  # [N, C + 1]: gate weights per column, then entropy, summed
    seq_columns: list[list[int]] | None = None  # per sequence, its K slots' columns (dense path)
    gather_cache: GatherCache | None = None  # the decode rows' gathered adapters (gathered path)
    # train-gate sets a list here to get every layer's per-token gate weights (dense path: [T, U])
    layer_gate_weights: list[torch.Tensor] | None = None

    def record_gate(self, rows: slice, weights: torch.Tensor) -> None:
        """Add one layer's gate weights [R, C] of token rows to the per-sequence sums."""
        entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1, keepdim=True)  # [R, 1]
        stats = torch.cat([weights, entropy], dim=1) * self.gated[rows, None]
        # Not detached: train_gate's balance loss is computed from these sums.
        self.gate_sums.index_add_(0, self.token_seq[rows], stats.to(self.gate_sums.dtype))
        if self.layer_gate_weights is not None:
            self.layer_gate_weights.append(weights)

    def seq_gate_sums(self, i: int) -> torch.Tensor:
        """Sequence i's gate sums over layers and tokens: its K adapters' weights in its own slot
        order, then the entropy. [K + 1]"""
        row = self.gate_sums[i]
        if self.seq_columns is None:
            return row
        cols = torch.tensor([*self.seq_columns[i], row.shape[0] - 1], device=row.device)
        return row.index_select(0, cols)

    def gate_totals(self) -> list[list[float]] | None:
        """seq_gate_sums of every sequence, as numbers; None when nothing was gated."""
        if self.gate_sums is None:
            return None
        return [self.seq_gate_sums(i).tolist() for i in range(self.gate_sums.shape[0])]


def build_lora_batch(
    sets: Sequence[tuple[Sequence[int], Sequence[float]]],
    num_tokens: Sequence[int],
    num_decode: int,
    device: torch.device,
    dtype: torch.dtype,
    gated: Sequence[bool] | None = None,
    force_dense: bool = False,
    gather_cache: GatherCache | None = None,
) -> LoRABatchInfo | None:
    """sets[i] = (slots, prior weights) of sequence i in step order; num_tokens[i] its tokens this
    step; gated[i] whether the gate weighs its adapters. None when no sequence uses an adapter:
    the step then runs the bare base model. force_dense: the dense path whatever the mix (gate
    training: a few adapters, long sequences). gather_cache: where the gathered path keeps its
    decode rows' adapters from step to step."""
    if not any(slots for slots, _ in sets):
        return None
    K = max(len(slots) for slots, _ in sets)
    counts = torch.tensor(list(num_tokens))
    padded = [tuple(s) + (0,) * (K - len(s)) for s, _ in sets]
    seq_slots = torch.tensor(padded, dtype=torch.long)
    spans, offset = [], num_decode
    for n in num_tokens[num_decode:]:
        spans.append((offset, n))
        offset += n
    info = LoRABatchInfo(seq_slots.to(device), num_decode, spans, None)

    unique = sorted({s for slots, _ in sets for s in slots if s != 0})
    if force_dense or len(unique) * DENSE_MIN_SEQS_PER_ADAPTER <= len(sets):
        column = {s: u for u, s in enumerate(unique)}
        rows = [[0.0] * len(unique) for _ in sets]  # [N, U]
        for row, (slots, weights) in zip(rows, sets):
            for s, w in zip(slots, weights):
                if s != 0:
                    row[column[s]] += w
        info.unique_slots = torch.tensor(unique, dtype=torch.long, device=device)
        if unique == list(range(unique[0], unique[-1] + 1)):
            info.unique_range = (unique[0], unique[-1] + 1)
        if any(w != 1 for row in rows for w in row):  # else: one adapter per sequence at weight 1
            info.token_weights = torch.tensor(rows, dtype=dtype).repeat_interleave(counts, dim=0).to(device)
        num_columns = len(unique)
    else:
        weights = torch.tensor([list(w) + [0.0] * (K - len(w)) for _, w in sets], dtype=dtype)
        info.token_weights = weights.repeat_interleave(counts, dim=0).to(device)
        num_columns = K
        if gather_cache is not None and num_decode and gather_cache.use(tuple(padded[:num_decode])):
            info.gather_cache = gather_cache

    if gated is not None and any(gated):
        info.gated = torch.tensor(list(gated)).repeat_interleave(counts).to(device)
        info.token_seq = torch.arange(len(sets)).repeat_interleave(counts).to(device)
        info.gate_sums = torch.zeros(len(sets), num_columns + 1, dtype=torch.float32, device=device)
        if info.unique_slots is not None:  # gate sums are per unique slot: map each sequence's K back
            info.seq_columns = [[column[s] for s in slots] for slots, _ in sets]
    return info
