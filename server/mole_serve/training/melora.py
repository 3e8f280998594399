"""MELoRA training (PEFT has no MELoRA): each target Linear of a transformers model gets n mini
LoRAs on its feature slices, trained with the base frozen, and the result is written in the
authors' layout (ChasonShi/MELoRA's peft fork): `peft_type: "MELORA"`, `r` and `lora_alpha` as
lists, tensors `base_model.model.<module>.lora_{A,B}.<i>.weight`. B starts at zero (the update
starts at 0), A as a LoRA's (Kaiming uniform); scaling alpha_i / r_i, as the authors'.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class MELoRALinear(nn.Module):
    """y = W x + concat_i (alpha/r) B_i A_i x_i, x_i the i-th of n input slices."""

    def __init__(self, base: nn.Linear, n: int, r: int, alpha: float) -> None:
        super().__init__()
        d_out, d_in = base.weight.shape
        if d_in % n or d_out % n:
            raise ValueError(f"{n} mini LoRAs cannot split a Linear of {d_in} inputs and {d_out} outputs evenly")
        self.base, self.n, self.scaling = base, n, alpha / r
        self.A = nn.Parameter(torch.empty(n, r, d_in // n))  # [n, r, d_in/n]
        self.B = nn.Parameter(torch.zeros(n, d_out // n, r))  # [n, d_out/n, r]
        for i in range(n):  # each mini LoRA's A as nn.Linear(d_in/n, r) would start
            nn.init.kaiming_uniform_(self.A.data[i], a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.reshape(*x.shape[:-1], self.n, -1)  # [..., n, d_in/n]
        z = torch.einsum("...ni,nri->...nr", xs, self.A)  # [..., n, r]
        delta = torch.einsum("...nr,nor->...no", z, self.B).reshape(*x.shape[:-1], -1)  # [..., d_out]
        return self.base(x) + self.scaling * delta


def inject_melora(model: nn.Module, targets: tuple[str, ...], n: int, r: int, alpha: float) -> dict[str, MELoRALinear]:
    """Replace every target Linear of `model` in place; freeze everything else. -> name -> module."""
    for p in model.parameters():
        p.requires_grad_(False)
    injected = {}
    for name, module in list(model.named_modules()):
        if name.split(".")[-1] in targets and isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            wrapped = MELoRALinear(module, n, r, alpha)
            setattr(model.get_submodule(parent_name), child, wrapped)
            injected[name] = wrapped
    return injected


def save_melora(
    injected: dict[str, MELoRALinear],
    folder: Path,
    targets: tuple[str, ...],
    n: int,
    r: int,
    alpha: float,
    base_model: str,
) -> None:
    """The authors' files (safetensors rather than their .bin: the server reads both)."""
    tensors = {}
    for name, m in injected.items():
        for i in range(n):
            tensors[f"base_model.model.{name}.lora_A.{i}.weight"] = m.A[i].detach().contiguous()
            tensors[f"base_model.model.{name}.lora_B.{i}.weight"] = m.B[i].detach().contiguous()
    save_file(tensors, Path(folder) / "adapter_model.safetensors")
    config = {
        "peft_type": "MELORA",
        "r": [r] * n,
        "lora_alpha": [alpha] * n,
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "mode": "melora",
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": base_model,
        "task_type": "CAUSAL_LM",
    }
    (Path(folder) / "adapter_config.json").write_text(json.dumps(config, indent=2))
