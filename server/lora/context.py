"""LoRAContext: everything one step's adapted layers need, built by the runner, read by the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.lora.backends.base import LoRABackend
from server.lora.batch import LoRABatchInfo
from server.lora.gate import PROBE_GROUP, GateStats, LayerGate
from server.lora.stacks import LayerStacks


@dataclass
class LoRAContext:
    stacks: list[LayerStacks]  # [layer][group]
    batch: LoRABatchInfo
    backend: LoRABackend
    gates: list[LayerGate] | None = None  # per layer, set when some sequence of the step is gated
    stats: GateStats | None = None  # what the gate did, per sequence

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor,
              weights: torch.Tensor | None = None) -> torch.Tensor | None:
        """out += the group's adapters applied to x (in place). The probe group goes first in a
        layer and sets its weights (the step's priors, or the gate's for gated tokens); the
        layer's other groups pass back the weights it returned."""
        gate = None
        if group == PROBE_GROUP:
            weights = self.batch.token_weights
            gate = self.gates[layer] if self.stats is not None and self.gates is not None else None
        return self.backend.apply(x, out, self.stacks[layer][group], self.batch, weights, gate, self.stats)
