"""Kind `lora`: PEFT LoRA (any subset of the 7 projections, alpha_pattern, rsLoRA scaling).

delta y = s * B A x,   A: [r, d_in], B: [d_out, r],   s = alpha / r  (alpha / sqrt(r) with rsLoRA)

On a base model whose checkpoint fuses projections (Phi-3's qkv_proj, gate_up_proj), PEFT names
the fused module: its LoRA becomes its parts' (the same A, B split by rows), scaled as the fused
module's.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

import torch

from mole_serve.lora.kinds.base import (
    MODULE_GROUPS,
    AdapterFormatError,
    AdapterWeights,
    LoRATargetSpec,
    check_runnable,
)

PEFT_TYPES: tuple[str, ...] = ("LORA",)
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


def _pattern_value(patterns: dict, module_key: str, default: float) -> float:
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module_key):
            return value
    return default


def lora_scaling(config: dict, module_key: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module_key, config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _check_config(name: str, config: dict) -> None:
    if config.get("use_dora"):
        raise AdapterFormatError(f"adapter {name!r}: DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"adapter {name!r}: trained biases (bias={config['bias']!r}) are not supported")
    if config.get("modules_to_save"):
        raise AdapterFormatError(f"adapter {name!r}: modules_to_save {config['modules_to_save']} is not supported")


def check_place(name: str, key: str, layer: int, module: str, spec: LoRATargetSpec) -> None:
    """A tensor's (layer, module) exists in the base model: a module of spec.shapes, or a fused
    module of its checkpoint (spec.fused)."""
    if module not in spec.shapes and module not in spec.fused:
        raise AdapterFormatError(f"adapter {name!r}: unknown target module {module!r} in {key!r}")
    if layer >= spec.num_layers:
        raise AdapterFormatError(f"adapter {name!r}: layer {layer} but the base model has {spec.num_layers}")


def checked_pair(
    name: str,
    where: str,
    A: torch.Tensor,
    B: torch.Tensor,
    shape: tuple[int, int],
    max_rank: int,
    scaling: Callable[[int], float],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA's (A [r, d_in], B [d_out, r]) checked against the module's (d_in, d_out): fp32,
    the scaling (of the rank) folded into B, and what that computes runnable in `dtype`
    (base.check_runnable)."""
    A, B = A.float(), B.float()
    d_in, d_out = shape
    r = A.shape[0] if A.dim() == 2 else -1
    if r < 1 or A.shape != (r, d_in) or B.shape != (d_out, r):
        raise AdapterFormatError(
            f"adapter {name!r}: {where} has A {tuple(A.shape)}, B {tuple(B.shape)}; "
            f"the base model needs A [r, {d_in}], B [{d_out}, r]"
        )
    if r > max_rank:
        raise AdapterFormatError(f"adapter {name!r}: rank {r} at {where} is over the limit {max_rank}")
    s = scaling(r)
    B = B * s
    check_runnable(name, where, A, B, s, dtype)
    return A.contiguous(), B.contiguous()


def checked_modules(
    name: str,
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]],
    spec: LoRATargetSpec,
    max_rank: int,
    config: dict,
    suffix: str = "",
) -> tuple[dict, int]:
    """(layer, module) -> {"A", "B"} tensors checked, scaled by `config`: (modules, largest rank).
    A fused module (spec.fused) is checked whole, then stored as its parts: the same A, its rows of
    B (every kind's LoRA pairs go through here, the MoE kinds' experts and shared LoRAs too).
    suffix: what follows `layers.{L}.{module}` in errors (an expert's `.experts.{e}`)."""
    modules, max_seen = {}, 0
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layers.{layer}.{module}{suffix}"
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"adapter {name!r}: {where} has lora_{next(iter(ab))} without its pair")
        A, B = checked_pair(
            name,
            where,
            ab["A"],
            ab["B"],
            spec.module_shape(module),
            max_rank,
            functools.partial(lora_scaling, config, where),
            spec.dtype,
        )
        parts = spec.parts(module)
        if len(parts) > 1 and any((layer, part) in pairs for part in parts):
            raise AdapterFormatError(f"adapter {name!r}: {where} and one of its parts {parts} are both adapted")
        for part, B_part in zip(parts, B.split([spec.shapes[m][1] for m in parts])):  # [d_out_j, r] each
            modules[(layer, part)] = (A, B_part.contiguous())
        max_seen = max(max_seen, A.shape[0])
    return modules, max_seen


def parse(
    name: str, config: dict, tensors: dict[str, torch.Tensor], spec: LoRATargetSpec, max_rank: int
) -> AdapterWeights:
    """Validate PEFT tensors against the base model and fold the scaling into B."""
    _check_config(name, config)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m is None:
            raise AdapterFormatError(f"adapter {name!r}: unexpected tensor {key!r} (only LoRA A/B of projections)")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        check_place(name, key, layer, module, spec)
        pairs.setdefault((layer, module), {})[which] = tensor
    if not pairs:
        raise AdapterFormatError(f"adapter {name!r}: no LoRA tensors found")
    modules, max_seen = checked_modules(name, pairs, spec, max_rank, config)
    return AdapterWeights(name=name, rank=max_seen, modules=modules, config=config)


def pack(weights: AdapterWeights, groups: dict, layer: int, slot: int, rank: int) -> None:
    """Write one layer of `weights` into pool slot `slot` of the layer's group stacks (padded to
    `rank`; modules it does not target stay zero)."""
    for group, module_names in MODULE_GROUPS.items():
        stack = groups[group]
        stack.A[slot].zero_()
        for j, module in enumerate(module_names):
            stack.B[j][slot].zero_()
            if (layer, module) in weights.modules:
                A, B = weights.modules[(layer, module)]  # [r, d_in], [d_out, r]
                r = A.shape[0]
                # non_blocking: asynchronous from the pinned CPU tier into CUDA stacks (no-op on CPU)
                stack.A[slot, j * rank : j * rank + r].copy_(A, non_blocking=True)
                stack.B[j][slot, :r].copy_(B.t(), non_blocking=True)


def reference_delta(weights: AdapterWeights, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None:
    """What the adapter adds to `module`'s output at `layer` for inputs x [T, d_in]: [T, d_out];
    None where it does not target the module."""
    if (layer, module) not in weights.modules:
        return None
    A, B = weights.modules[(layer, module)]
    return x @ A.t() @ B.t()
