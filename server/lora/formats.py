"""Read PEFT LoRA folders (adapter_config.json + adapter_model.safetensors) and check them
against the base model. Every problem is an AdapterFormatError naming the adapter."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Modules that read the same input share one A stack (one gather, one shrink); the model fuses
# their base weights in this order too.
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


class AdapterFormatError(ValueError):
    pass


@dataclass(frozen=True)
class LoRATargetSpec:
    """What an adapter may target in the base model: module -> (d_in, d_out), per layer."""

    num_layers: int
    shapes: dict[str, tuple[int, int]]


@dataclass
class LoRAWeights:
    name: str
    rank: int  # largest rank over its modules
    # (layer, module) -> (A [r, d_in], B [d_out, r] with the alpha/r scaling folded in)
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    config: dict = field(default_factory=dict)


def _pattern_value(patterns: dict, module_key: str, default: float) -> float:
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module_key):
            return value
    return default


def lora_scaling(config: dict, module_key: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module_key, config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _check_config(name: str, config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"adapter {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise AdapterFormatError(f"adapter {name!r}: DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"adapter {name!r}: trained biases (bias={config['bias']!r}) are not supported")
    if config.get("modules_to_save"):
        raise AdapterFormatError(f"adapter {name!r}: modules_to_save {config['modules_to_save']} is not supported")


def parse_lora(
    name: str, config: dict, tensors: dict[str, torch.Tensor], spec: LoRATargetSpec, max_rank: int
) -> LoRAWeights:
    """Validate PEFT tensors against the base model and fold the scaling into B."""
    _check_config(name, config)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m is None:
            raise AdapterFormatError(f"adapter {name!r}: unexpected tensor {key!r} (only LoRA A/B of projections)")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in spec.shapes:
            raise AdapterFormatError(f"adapter {name!r}: unknown target module {module!r} in {key!r}")
        if layer >= spec.num_layers:
            raise AdapterFormatError(f"adapter {name!r}: layer {layer} but the base model has {spec.num_layers}")
        pairs.setdefault((layer, module), {})[which] = tensor
    if not pairs:
        raise AdapterFormatError(f"adapter {name!r}: no LoRA tensors found")
    modules, max_seen = {}, 0
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"adapter {name!r}: {where} has lora_{next(iter(ab))} without its pair")
        A, B = ab["A"].float(), ab["B"].float()
        d_in, d_out = spec.shapes[module]
        r = A.shape[0]
        if A.shape != (r, d_in) or B.shape != (d_out, r):
            raise AdapterFormatError(
                f"adapter {name!r}: {where} has A {tuple(A.shape)}, B {tuple(B.shape)}; "
                f"the base model needs A [r, {d_in}], B [{d_out}, r]"
            )
        if r > max_rank:
            raise AdapterFormatError(f"adapter {name!r}: rank {r} at {where} is over the limit {max_rank}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterFormatError(f"adapter {name!r}: {where} holds non-finite values")
        modules[(layer, module)] = (A.contiguous(), (B * lora_scaling(config, where, r)).contiguous())
        max_seen = max(max_seen, r)
    return LoRAWeights(name=name, rank=max_seen, modules=modules, config=config)


def load_peft_dir(path: Path, spec: LoRATargetSpec, max_rank: int, name: str | None = None) -> LoRAWeights:
    path = Path(path)
    name = name or path.name
    config_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_path.is_file():
        raise AdapterFormatError(f"adapter {name!r}: {config_path} is missing")
    if not weights_path.is_file():
        raise AdapterFormatError(f"adapter {name!r}: {weights_path} is missing (only safetensors is read)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"adapter {name!r}: adapter_config.json is not valid JSON: {e}") from e
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise AdapterFormatError(f"adapter {name!r}: cannot read adapter_model.safetensors: {e}") from e
    return parse_lora(name, config, tensors, spec, max_rank)
