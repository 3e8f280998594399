"""LoRA backends by name (MOLE_LORA_BACKEND), imported only when chosen: a CUDA kernel backend
must not be imported on a machine without its toolchain."""

from __future__ import annotations

import importlib

from mole_serve.lora.backends.base import LoRABackend

# name -> (module, class)
BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("mole_serve.lora.backends.torch_ref", "TorchBackend"),
    "triton": ("mole_serve.lora.backends.triton", "TritonBackend"),
    "reference": ("mole_serve.lora.backends.base", "ReferenceBackend"),
}


def create_backend(name: str, **options) -> LoRABackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; expected one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(**options)
