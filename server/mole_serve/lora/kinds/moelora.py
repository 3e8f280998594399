"""Kind `moelora` (Luo et al. 2024, arXiv 2402.12851, "MoELoRA: Contrastive Learning Guided
Mixture of Experts on Parameter-Efficient Fine-Tuning"): each adapted linear is a mixture of E
LoRA experts with its own top-k router on that linear's input (MoEWeights, ffn=False),

    y = W x + sum_{e in topk} w_e s B_e A_e x,   w = renormalized top-k of softmax(W_g x).

The paper ships no code or format; the layout is MoE-PEFT's per-linear MoE (its MoLA, the same
forward), so MoE-PEFT `MOLA` folders load too:

    {prefix}.layers.{L}.{self_attn|mlp}.{proj}.moe_gate.weight                  [E, d_in]
    {prefix}.layers.{L}.{self_attn|mlp}.{proj}.experts.{e}.lora_{A,B}.weight

Config: peft_type "MOELORA" (or "MOLA"), num_experts, top_k (default 2), r, lora_alpha,
use_rslora, and `top_k_renormalize` (default true: MoLA divides the k kept probabilities by their
sum; the paper leaves it open).

On a base model whose checkpoint fuses projections (Phi-3's qkv_proj, gate_up_proj) the routed
linear is the fused one: each expert splits into its parts as a LoRA does (kinds/lora.py), and
its router, on the input every part shares, routes each part alike (one copy per part).
"""

from __future__ import annotations

import re

import torch

from mole_serve.lora.kinds import moe
from mole_serve.lora.kinds.base import AdapterFormatError, AdapterWeights, LoRATargetSpec, MoEWeights
from mole_serve.lora.kinds.lora import check_place
from mole_serve.lora.kinds.lora import pack as pack  # no shared part: the primary slot stays zero
from mole_serve.lora.kinds.lora import reference_delta as reference_delta

PEFT_TYPES: tuple[str, ...] = ("MOELORA", "MOLA")
_ROUTER = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.moe_gate\.weight$")
_EXPERT = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.experts\.(\d+)\.lora_([AB])\.weight$")


def parse(
    name: str, config: dict, tensors: dict[str, torch.Tensor], spec: LoRATargetSpec, max_rank: int
) -> AdapterWeights:
    strategy = config.get("routing_strategy", "moelora")
    if strategy not in ("moelora", "mola"):
        raise AdapterFormatError(
            f"adapter {name!r}: unknown routing_strategy {strategy!r} for a MoELoRA "
            "(expected 'moelora' or 'mola': top-k)"
        )
    moe.reject_dora(name, config)
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"adapter {name!r}: trained biases (bias={config['bias']!r}) are not supported")
    renormalize = config.get("top_k_renormalize", True)
    if not isinstance(renormalize, bool):
        raise AdapterFormatError(f"adapter {name!r}: `top_k_renormalize` must be true or false")
    num_experts, top_k = moe.experts_and_top_k(name, config)
    routers: dict[tuple[int, str], torch.Tensor] = {}
    found: moe.Found = {}
    for key, tensor in tensors.items():
        if m := _ROUTER.search(key):
            layer, module = int(m.group(1)), m.group(2)
            check_place(name, key, layer, module, spec)
            routers[(layer, module)] = moe.checked_router(
                name, f"layers.{layer}.{module}", tensor, num_experts, spec.module_shape(module)[0]
            )
        elif m := _EXPERT.search(key):
            layer, module = int(m.group(1)), m.group(2)
            check_place(name, key, layer, module, spec)
            found.setdefault((layer, module, int(m.group(3))), {})[m.group(4)] = tensor
        else:
            raise AdapterFormatError(
                f"adapter {name!r}: unexpected tensor {key!r} (a MoELoRA holds per-module "
                "moe_gate routers and experts.{e}.lora_A/B)"
            )
    routed = {(layer, module) for layer, module, _ in found}
    if not routed:
        raise AdapterFormatError(f"adapter {name!r}: no MoELoRA experts found")
    for layer, module in sorted(routed ^ set(routers)):
        what = "experts but no router" if (layer, module) in routed else "a router but no experts"
        raise AdapterFormatError(f"adapter {name!r}: layers.{layer}.{module} has {what}")
    experts, rank = moe.checked_experts(name, found, num_experts, spec, max_rank, config)
    # after checked_experts: it refuses a fused module routed beside one of its parts
    routers = {(layer, part): W for (layer, module), W in routers.items() for part in spec.parts(module)}
    return AdapterWeights(
        name=name,
        rank=rank,
        modules={},
        config=config,
        kind="moelora",
        moe=MoEWeights(num_experts, top_k, experts, routers, ffn=False, renormalize=renormalize),
    )
