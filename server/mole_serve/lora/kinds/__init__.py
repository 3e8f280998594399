"""Adapter kinds by PEFT type: one module each behind the contract of kinds/base.py."""

from __future__ import annotations

from mole_serve.lora.kinds import lora, melora, mixlora, moelora
from mole_serve.lora.kinds.base import AdapterFormatError, AdapterKind

KINDS: dict[str, AdapterKind] = {"lora": lora, "melora": melora, "mixlora": mixlora, "moelora": moelora}
# Kinds whose own routers mix their experts: a request names such an adapter alone.
RUNS_ALONE = frozenset({"mixlora", "moelora"})


def kind_for(name: str, config: dict) -> AdapterKind:
    """The kind module that reads an adapter with this adapter_config.json."""
    peft_type = config.get("peft_type", "LORA")
    for module in KINDS.values():
        if peft_type in module.PEFT_TYPES:
            return module
    supported = ", ".join(t for m in KINDS.values() for t in m.PEFT_TYPES)
    raise AdapterFormatError(f"adapter {name!r}: peft_type {peft_type!r} is not supported (supported: {supported})")
