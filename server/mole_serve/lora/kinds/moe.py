"""What the two mixture-of-LoRA-experts kinds (mixlora.py, moelora.py) read alike: the expert
count and top-k of the config, the routers, and E experts' LoRA pairs, checked against the base."""

from __future__ import annotations

from typing import TypeGuard

import torch

from mole_serve.lora.kinds.base import AdapterFormatError, LoRATargetSpec
from mole_serve.lora.kinds.lora import checked_modules

Found = dict[tuple[int, str, int], dict[str, torch.Tensor]]  # (layer, module, expert) -> {"A": .., "B": ..}
# The largest router entry. A router's logits W_g x meet a softmax in fp32, which is one-hot once
# two logits differ by about a hundred: entries past this bound (over inputs of order one, as the
# routed modules' normalized inputs are) change no routing a trained router could mean, and only
# bring the logits towards overflow, where the softmax turns to NaN.
MAX_ROUTER_ENTRY = 1e3


def _positive_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def experts_and_top_k(name: str, config: dict) -> tuple[int, int]:
    num_experts, top_k = config.get("num_experts"), config.get("top_k", 2)
    if not _positive_int(num_experts):
        raise AdapterFormatError(f"adapter {name!r}: `num_experts` must be a positive integer, got {num_experts!r}")
    if not _positive_int(top_k) or top_k > num_experts:
        raise AdapterFormatError(
            f"adapter {name!r}: `top_k` must be an integer from 1 to num_experts ({num_experts}), got {top_k!r}"
        )
    return num_experts, top_k


def reject_dora(name: str, *configs: dict) -> None:
    if any(c.get("use_dora") for c in configs):
        raise AdapterFormatError(
            f"adapter {name!r}: DoRA experts are not supported (MoE-PEFT saves no "
            "magnitude vectors, so a saved DoRA expert is not the expert it trained)"
        )


def checked_router(name: str, where: str, W: torch.Tensor, num_experts: int, d_in: int) -> torch.Tensor:
    """A router W_g [E, d_in], kept in fp32 (MoE-PEFT routes in fp32)."""
    if tuple(W.shape) != (num_experts, d_in):
        raise AdapterFormatError(
            f"adapter {name!r}: the router at {where} has shape {tuple(W.shape)}; "
            f"num_experts={num_experts} and the base model need [{num_experts}, {d_in}]"
        )
    W = W.float()
    if not torch.isfinite(W).all():
        raise AdapterFormatError(f"adapter {name!r}: the router at {where} holds non-finite values")
    peak = W.abs().max().item()
    if peak > MAX_ROUTER_ENTRY:
        raise AdapterFormatError(
            f"adapter {name!r}: the router at {where} has an entry of {peak:.3g}; the limit is {MAX_ROUTER_ENTRY:.0e}"
        )
    return W.contiguous()


def checked_experts(
    name: str, found: Found, num_experts: int, spec: LoRATargetSpec, max_rank: int, config: dict
) -> tuple[list[dict], int]:
    """Per expert, (layer, module) -> (A, scaled B); and the largest rank. Every routed module must
    have all E experts; `config` gives their r / lora_alpha / use_rslora."""
    per_module: dict[tuple[int, str], set[int]] = {}
    for layer, module, e in found:
        if e >= num_experts:
            raise AdapterFormatError(
                f"adapter {name!r}: layers.{layer}.{module} has expert {e}, but num_experts is {num_experts}"
            )
        per_module.setdefault((layer, module), set()).add(e)
    for (layer, module), have in sorted(per_module.items()):
        missing = sorted(set(range(num_experts)) - have)
        if missing:
            raise AdapterFormatError(
                f"adapter {name!r}: layers.{layer}.{module} lacks experts "
                f"{', '.join(map(str, missing))} of {num_experts}"
            )
    checked = [
        checked_modules(
            name, {place: found[place + (e,)] for place in per_module}, spec, max_rank, config, f".experts.{e}"
        )
        for e in range(num_experts)
    ]
    return [modules for modules, _ in checked], max((r for _, r in checked), default=0)
