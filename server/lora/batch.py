"""LoRABatchInfo: which pool slots and weights each token of a step uses. Built once per step,
read by every adapted layer (ops.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Dense path when the step's distinct adapters are shared by at least this many sequences each
# on average: its wasted FLOPs (every token against every unique slot) then cost less than
# gathering a copy of each sequence's adapters.
DENSE_MIN_SEQS_PER_ADAPTER = 4


@dataclass
class LoRABatchInfo:
    seq_slots: torch.Tensor  # [N, K] pool slots per sequence, 0 (the all-zero slot) pads
    seq_weights: torch.Tensor  # [N, K] weights, 0 on padding
    num_decode: int  # the first num_decode sequences have one token each
    prefill_spans: list[tuple[int, int]]  # (token offset, length) of the other sequences
    unique_slots: torch.Tensor | None = None  # [U], set when the dense path is chosen
    token_weights: torch.Tensor | None = None  # [T, U] with unique_slots; None there if every weight is 1
    unique_range: tuple[int, int] | None = None  # (s0, s1) when unique_slots == arange(s0, s1)


def build_lora_batch(
    sets: Sequence[tuple[Sequence[int], Sequence[float]]],
    num_tokens: Sequence[int],
    num_decode: int,
    device: torch.device,
    dtype: torch.dtype,
) -> LoRABatchInfo | None:
    """sets[i] = (slots, weights) of sequence i in step order; num_tokens[i] its tokens this step.
    Returns None when no sequence uses an adapter: the step then runs the bare base model."""
    if not any(slots for slots, _ in sets):
        return None
    K = max(len(slots) for slots, _ in sets)
    slot_rows = [list(s) + [0] * (K - len(s)) for s, _ in sets]
    weight_rows = [list(w) + [0.0] * (K - len(w)) for _, w in sets]
    seq_slots = torch.tensor(slot_rows, dtype=torch.long)
    seq_weights = torch.tensor(weight_rows, dtype=dtype)
    spans, offset = [], num_decode
    for n in num_tokens[num_decode:]:
        spans.append((offset, n))
        offset += n
    info = LoRABatchInfo(seq_slots, seq_weights, num_decode, spans)

    unique = sorted({s for slots, _ in sets for s in slots if s != 0})
    if len(unique) * DENSE_MIN_SEQS_PER_ADAPTER <= len(sets):
        column = {s: u for u, s in enumerate(unique)}
        rows = [[0.0] * len(unique) for _ in sets]  # [N, U]
        for row, (slots, weights) in zip(rows, sets):
            for s, w in zip(slots, weights):
                if s != 0:
                    row[column[s]] += w
        info.unique_slots = torch.tensor(unique, dtype=torch.long, device=device)
        if any(w != 1 for row in rows for w in row):  # else: one adapter per sequence at weight 1
            seq_w = torch.tensor(rows, dtype=dtype)
            info.token_weights = seq_w.repeat_interleave(torch.tensor(list(num_tokens)), dim=0).to(device)
        if unique == list(range(unique[0], unique[-1] + 1)):
            info.unique_range = (unique[0], unique[-1] + 1)
    info.seq_slots = seq_slots.to(device)
    info.seq_weights = seq_weights.to(device)
    return info
