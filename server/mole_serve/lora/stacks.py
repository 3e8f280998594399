"""The slot stacks: every resident adapter's A and B, per (layer, module group), on the device.

Modules that read the same input (q/k/v, gate/up) share one A stack, so one gather and one
shrink serve the whole group:

    A: [slots, n * r, d_in]     rows j*r:(j+1)*r belong to module j of the group (PEFT lora_A layout)
    B[j]: [slots, r, d_out_j]   the kind's scaling already folded in

Slot 0 stays all zeros (a sequence without adapters points there). Every slot is padded to the
stacks' rank r; an op reads only the first `rank` rows of each module block (`rows`), the largest
rank among the slots it uses: the rows past an adapter's own rank are zero, so the cut is exact.
The pool allocates and fills them (through the adapter's kind); backends only read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mole_serve.lora.kinds.base import MODULE_GROUPS, LoRATargetSpec


@dataclass
class GroupStack:
    A: torch.Tensor  # [slots, n * r, d_in]
    B: list[torch.Tensor]  # n x [slots, r, d_out_j]
    out_columns: list[tuple[int, int]]  # where module j's output sits in the fused projection

    @property
    def rank(self) -> int:
        return self.B[0].shape[1]

    def rows(self, t: torch.Tensor, slots: torch.Tensor, slot_range: tuple[int, int] | None, rank: int) -> torch.Tensor:
        """t (A, or one of B) at `slots`, each module block cut to its first `rank` rows: [U, m*rank,
        cols] (m = n for A, 1 for B_j). A view when slots == arange(*slot_range) and nothing is cut
        (or one slot of one block); else a copy that reads only those rows."""
        S, _, cols = t.shape
        blocks = t.view(S, -1, self.rank, cols)[:, :, :rank]  # [S, m, rank, cols]
        picked = blocks[slot_range[0] : slot_range[1]] if slot_range else blocks.index_select(0, slots.reshape(-1))
        return picked.reshape(len(picked), blocks.shape[1] * rank, cols)


LayerStacks = dict[str, GroupStack]  # group name -> its stack, for one decoder layer


def new_layer_stacks(
    spec: LoRATargetSpec, slots: int, rank: int, dtype: torch.dtype, device: torch.device
) -> LayerStacks:
    groups = {}
    for group, modules in MODULE_GROUPS.items():
        d_in = spec.shapes[modules[0]][0]
        outs = [spec.shapes[m][1] for m in modules]
        columns, c = [], 0
        for d_out in outs:
            columns.append((c, c + d_out))
            c += d_out
        groups[group] = GroupStack(
            A=torch.zeros(slots, len(modules) * rank, d_in, dtype=dtype, device=device),
            B=[torch.zeros(slots, rank, d_out, dtype=dtype, device=device) for d_out in outs],
            out_columns=columns,
        )
    return groups


def copy_slots(src: LayerStacks, dst: LayerStacks) -> None:
    """Every slot of `src` into `dst` at dst's rank: the first min(ranks) rows of each module. Exact
    while dst's rank is at least that of every adapter held (the rows past an adapter's own rank are
    zero, so padding adds zeros and cutting drops only zeros)."""
    for group, modules in MODULE_GROUPS.items():
        s, d = src[group], dst[group]
        old, new = s.rank, d.rank
        kept = min(old, new)
        for j in range(len(modules)):
            d.A[:, j * new : j * new + kept] = s.A[:, j * old : j * old + kept]
            d.B[j][:, :kept] = s.B[j][:, :kept]


def slot_bytes(stacks: list[LayerStacks]) -> int:
    """One slot's A and B over all layers and groups."""
    return sum(
        g.A[0].numel() * g.A.element_size() + sum(B[0].numel() * B.element_size() for B in g.B)
        for groups in stacks
        for g in groups.values()
    )
