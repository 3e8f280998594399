"""The contract every adapter kind meets, and what an adapter may target in the base model.

A kind module (lora.py today; melora, moe next) states: the `peft_type` values it reads, `parse`
(config + tensors -> validated weights, scaling folded in), `pack` (weights -> one pool slot of
the stacks) and `reference_delta` (the naive per-module output, the tests' oracle). Reading the
files is the library's job; nothing here touches disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from server.errors import InvalidAdapter

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Modules that read the same input share one A stack (one gather, one shrink); the model fuses
# their base weights in this order too.
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


class AdapterFormatError(InvalidAdapter):
    """An adapter's files do not describe an adapter this server can serve; names the adapter."""


@dataclass(frozen=True)
class LoRATargetSpec:
    """What an adapter may target in the base model: module -> (d_in, d_out), per layer."""

    num_layers: int
    shapes: dict[str, tuple[int, int]]


@dataclass
class AdapterWeights:
    """A parsed adapter of some kind, ready to pack into a pool slot."""

    name: str
    rank: int  # largest rank over its modules: the stacks' rank must be at least this
    # (layer, module) -> (A [r, d_in], B [d_out, r] with the scaling folded in)
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    config: dict = field(default_factory=dict)
    kind: str = "lora"
    # The kind's native form where it differs from `modules` (melora: per module, A [n, r, d_in/n]
    # and B [n, d_out/n, r] of its n mini LoRAs, scaling folded in); None for a plain LoRA.
    blocks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None = None


class AdapterKind(Protocol):
    PEFT_TYPES: tuple[str, ...]

    def parse(self, name: str, config: dict, tensors: dict[str, torch.Tensor], spec: LoRATargetSpec,
              max_rank: int) -> AdapterWeights: ...

    def pack(self, weights: AdapterWeights, groups: dict, layer: int, slot: int, rank: int) -> None: ...

    def reference_delta(self, weights: AdapterWeights, layer: int, module: str,
                        x: torch.Tensor) -> torch.Tensor | None: ...
