"""The trained gate beside the adapters (adapters_store/gate/): written and read back, refused
with a clear error when it was trained for another base model."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mole_serve.errors import InvalidAdapter
from mole_serve.library.store import GATE_CONFIG, GATE_WEIGHTS
from mole_serve.lora.gate import GateConfig, MoLEGate


class GateFormatError(InvalidAdapter):
    code = "invalid_gate"


class GateBaseMismatch(GateFormatError):
    """A readable gate trained for another base model: serving goes on without it (compose.build),
    `auto` composing its retrieved adapters with `mixture`."""


def save_gate(gate: MoLEGate, folder: Path, extra: dict | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: p.detach().contiguous() for name, p in gate.named_parameters()}, folder / GATE_WEIGHTS)
    (folder / GATE_CONFIG).write_text(json.dumps({**asdict(gate.config), **(extra or {})}, indent=2))


def load_gate(folder: Path, expected: GateConfig) -> MoLEGate:
    """The gate in `folder`, refused with a clear error if it was trained for another base
    (GateBaseMismatch) or cannot be read (GateFormatError)."""
    folder = Path(folder)
    try:
        raw = json.loads((folder / GATE_CONFIG).read_text())
        tensors = load_file(folder / GATE_WEIGHTS)
    except (OSError, SafetensorError, ValueError) as e:
        raise GateFormatError(f"gate in {folder}: cannot read it: {e}") from e
    config = GateConfig(**{k: raw[k] for k in GateConfig.__dataclass_fields__ if k in raw})
    for field in ("num_layers", "hidden_size", "probe_size"):
        if getattr(config, field) != getattr(expected, field):
            raise GateBaseMismatch(
                f"gate in {folder} was trained for base model {config.base_model!r} ({field}="
                f"{getattr(config, field)}); the served base {expected.base_model!r} has "
                f"{field}={getattr(expected, field)}"
            )
    if config.base_model != expected.base_model:
        raise GateBaseMismatch(
            f"gate in {folder} was trained for base model {config.base_model!r}, not the served {expected.base_model!r}"
        )
    gate = MoLEGate(config)
    try:
        gate.load_state_dict(tensors)
    except RuntimeError as e:
        raise GateFormatError(f"gate in {folder}: weights don't match its config: {e}") from e
    return gate.requires_grad_(False)
