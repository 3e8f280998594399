"""Kind `melora` (Ren et al. 2024; the authors' code ChasonShi/MELoRA, a fork of peft 0.5.0):
n mini LoRAs per module, each on its own slice of the input and output features,

    delta W = blockdiag(s_1 B_1 A_1, ..., s_n B_n A_n),   A_i: [r_i, d_in/n], B_i: [d_out/n, r_i],
    s_i = alpha_i / r_i,

so r * (d_in + d_out) parameters give an update of rank sum(r_i). The weights are also held as
the exactly equal dense LoRA of rank R = sum(r_i) (A = blockdiag(A_i) [R, d_in], B =
blockdiag(s_i B_i) [d_out, R], scaling 1): that form packs into the slot stacks like any LoRA, so
a MELoRA adapter runs in every composition (gate candidate, static merges) and mixes with every
kind in one batch. `blocks` keeps the native form for the backends that run it as n small bmms.
"""

from __future__ import annotations

import re
from typing import cast

import torch

from mole_serve.lora.kinds.base import AdapterFormatError, AdapterWeights, LoRATargetSpec, check_runnable
from mole_serve.lora.kinds.lora import pack as pack  # the dense equivalent packs as any LoRA

PEFT_TYPES: tuple[str, ...] = ("MELORA",)
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.(\d+)\.weight$")


def _per_mini(name: str, config: dict, field: str, n: int | None) -> list[float]:
    value = config.get(field)
    values = value if isinstance(value, list) else [value] * (n or 1)
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
        raise AdapterFormatError(f"adapter {name!r}: `{field}` must be a positive number per mini LoRA, got {value!r}")
    if n is not None and len(values) != n:
        raise AdapterFormatError(f"adapter {name!r}: `{field}` has {len(values)} entries for {n} mini LoRAs")
    return cast(list[float], values)  # each checked a positive number above


def parse(
    name: str, config: dict, tensors: dict[str, torch.Tensor], spec: LoRATargetSpec, max_rank: int
) -> AdapterWeights:
    """The authors' tensors, checked block by block against the base; scaling folded into B."""
    ranks = [int(r) for r in _per_mini(name, config, "r", None)]
    n = len(ranks)
    alphas = _per_mini(name, config, "lora_alpha", n)
    R = sum(ranks)
    if R > max_rank:
        raise AdapterFormatError(
            f"adapter {name!r}: rank {R} (the sum of its {n} mini ranks) is over the limit {max_rank}"
        )
    found: dict[tuple[int, str], dict[tuple[str, int], torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m is None:
            raise AdapterFormatError(f"adapter {name!r}: unexpected tensor {key!r} (only MELoRA lora_A.i / lora_B.i)")
        layer, module, which, i = int(m.group(1)), m.group(2), m.group(3), int(m.group(4))
        if module not in spec.shapes:
            raise AdapterFormatError(f"adapter {name!r}: unknown target module {module!r} in {key!r}")
        if layer >= spec.num_layers or i >= n:
            raise AdapterFormatError(
                f"adapter {name!r}: {key!r} is out of range (the base has {spec.num_layers} "
                f"layers, the config {n} mini LoRAs)"
            )
        found.setdefault((layer, module), {})[(which, i)] = tensor
    if not found:
        raise AdapterFormatError(f"adapter {name!r}: no MELoRA tensors found")
    modules, blocks = {}, {}
    for (layer, module), parts in sorted(found.items()):
        where = f"layers.{layer}.{module}"
        d_in, d_out = spec.shapes[module]
        if d_in % n or d_out % n:
            raise AdapterFormatError(
                f"adapter {name!r}: {where} has {d_in} inputs and {d_out} outputs, which "
                f"{n} mini LoRAs cannot split evenly"
            )
        missing = [f"lora_{w}.{i}" for i in range(n) for w in "AB" if (w, i) not in parts]
        if missing:
            raise AdapterFormatError(f"adapter {name!r}: {where} lacks {', '.join(missing)}")
        A_blocks, B_blocks = [], []
        for i, (r, alpha) in enumerate(zip(ranks, alphas)):
            A, B = parts[("A", i)].float(), parts[("B", i)].float()
            if A.shape != (r, d_in // n) or B.shape != (d_out // n, r):
                raise AdapterFormatError(
                    f"adapter {name!r}: {where} mini LoRA {i} has A {tuple(A.shape)}, B {tuple(B.shape)}; "
                    f"the base model and r[{i}]={r} need A [{r}, {d_in // n}], B [{d_out // n}, {r}]"
                )
            scaling = alpha / r
            B = B * scaling
            check_runnable(name, f"{where} mini LoRA {i}", A, B, scaling, spec.dtype)
            A_blocks.append(A)
            B_blocks.append(B)
        modules[(layer, module)] = (torch.block_diag(*A_blocks), torch.block_diag(*B_blocks))  # [R, d_in], [d_out, R]
        if len(set(ranks)) == 1:  # the native form stacks equal ranks
            blocks[(layer, module)] = (torch.stack(A_blocks), torch.stack(B_blocks))  # [n, r, d_in/n], [n, d_out/n, r]
    # As a LoRA its config is that of the dense equivalent: rank R with scaling 1 (merges read it).
    dense = {
        **config,
        "peft_type": "LORA",
        "r": R,
        "lora_alpha": R,
        "alpha_pattern": {},
        "rank_pattern": {},
        "use_rslora": False,
        "melora": {"r": ranks, "lora_alpha": alphas},
    }
    return AdapterWeights(name=name, rank=R, modules=modules, config=dense, kind="melora", blocks=blocks or None)


def reference_delta(weights: AdapterWeights, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None:
    """The authors' forward, mini LoRA by mini LoRA on its feature slice (needs equal mini ranks):
    x [T, d_in] -> [T, d_out]."""
    if weights.blocks is None or (layer, module) not in weights.blocks:
        return None
    A, B = weights.blocks[(layer, module)]  # [n, r, d_in/n], [n, d_out/n, r]
    n = A.shape[0]
    xs = x.view(x.shape[0], n, -1).transpose(0, 1)  # [n, T, d_in/n]
    return torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B.transpose(1, 2)).transpose(0, 1).reshape(x.shape[0], -1)
