"""LoRAContext: everything one step's adapted layers need, built by the runner, read by the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mole_serve.lora.backends.base import LoRABackend
from mole_serve.lora.batch import BlockRows, LoRABatchInfo
from mole_serve.lora.gate import PROBE_GROUP, GateStats, LayerGate
from mole_serve.lora.kinds.base import MODULE_GROUPS
from mole_serve.lora.moe import ExpertRows
from mole_serve.lora.stacks import LayerStacks


@dataclass
class LoRAContext:
    stacks: list[LayerStacks]  # [layer][group]
    batch: LoRABatchInfo | None  # the rows on the dense stacks (None: every adapted row runs native blocks)
    backend: LoRABackend
    gates: list[LayerGate] | None = None  # per layer, set when some sequence of the step is gated
    stats: GateStats | None = None  # what the gate did, per sequence
    blocks: list[BlockRows] = field(default_factory=list)  # rows on native block forms, per block shape
    block_stacks: dict = field(default_factory=dict)  # the pool's, per block shape
    experts: list[ExpertRows] = field(default_factory=list)  # rows on a mixture of LoRA experts, per adapter

    def apply(
        self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """out += the group's adapters applied to x (in place). The probe group goes first in a
        layer and sets its weights (the step's priors, or the gate's for gated tokens); the
        layer's other groups pass back the weights it returned."""
        stack = self.stacks[layer][group]
        for rows in self.blocks:
            modules = self.block_stacks[rows.shape][layer]
            for module, columns in zip(MODULE_GROUPS[group], stack.out_columns):
                if module in modules:
                    A, B = modules[module]
                    self.backend.apply_blocks(x, out[:, columns[0] : columns[1]], A, B, rows)
        for experts in self.experts:
            experts.apply(self.backend, layer, group, stack, x, out)
        if self.batch is None:
            return None
        gate = None
        if group == PROBE_GROUP:
            weights = self.batch.token_weights
            gate = self.gates[layer] if self.stats is not None and self.gates is not None else None
        return self.backend.apply(x, out, stack, self.batch, weights, gate, self.stats)

    def mix_ffn(self, layer: int, h: torch.Tensor, gate_up: torch.Tensor, act: torch.Tensor) -> None:
        """The FFN experts' rows (MixLoRA): act [T, I] becomes each row's mixture of its experts'
        activations, in place, before the base down projection. h: the FFN input; gate_up: its
        fused base gate/up output."""
        for rows in self.experts:
            rows.mix_ffn(self.backend, layer, self.stacks[layer], h, gate_up, act)
