"""Kind `mixlora` (Li et al. 2024, arXiv 2404.15159; the format of MoE-PEFT and the `mixlora`
package, and of m-LoRA <= 0.3): per layer, plain LoRAs on the attention projections shared by all
experts, and E FFN experts, each the whole SwiGLU FFN with its own gate/up/down LoRAs over the
frozen base weights, mixed by a top-k router on the FFN input (MoEWeights, ffn=True).

    mixlora.layers.{L}.self_attn.{proj}.lora_{A,B}.weight               shared attention LoRAs
    mixlora.layers.{L}.mlp.moe_gate.weight                  [E, d]      the router
    mixlora.layers.{L}.mlp.{gate,up,down}_proj.experts.{e}.lora_{A,B}.weight

Legacy m-LoRA names (routing_strategy "mixtral"): `layers.{L}.gate.weight` for the router and
`layers.{L}.experts.{e}.{w1,w2,w3}_proj` (= gate, down, up). Experts use `expert_lora`'s r and
alpha when present (MoE-PEFT), the top-level ones otherwise.

On a base model whose checkpoint fuses projections (Phi-3) the LoRAs name the fused modules
(`self_attn.qkv_proj`, `mlp.gate_up_proj.experts.{e}`, as the mixlora package's Phi-3 forward
reads them); each splits into its parts as a LoRA does (kinds/lora.py).
"""

from __future__ import annotations

import re

import torch
from transformers.activations import ACT2FN

from mole_serve.lora.kinds import moe
from mole_serve.lora.kinds.base import FFN_ROUTER, AdapterFormatError, AdapterWeights, LoRATargetSpec, MoEWeights
from mole_serve.lora.kinds.lora import check_place, checked_modules
from mole_serve.lora.kinds.lora import pack as pack  # the shared attention LoRAs pack as any LoRA
from mole_serve.lora.kinds.lora import reference_delta as reference_delta

PEFT_TYPES: tuple[str, ...] = ("MIXLORA",)
FFN_MODULES = ("gate_proj", "up_proj", "down_proj")
LEGACY_NAMES = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}
UNSUPPORTED_STRATEGIES = {
    "mixlora-dynamic": "top-p routing keeps a varying number of experts per token at unnormalized weights",
    "mixlora-switch": "MoE-PEFT's own switch inference returns its input unchanged, so no reference defines it",
}
_ATTN = re.compile(r"^mixlora\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.weight$")
_ROUTER = re.compile(r"^mixlora\.layers\.(\d+)\.(?:mlp\.moe_gate|gate)\.weight$")
_EXPERT = re.compile(
    r"^mixlora\.layers\.(\d+)\.(?:mlp\.(\w+)\.experts\.(\d+)|experts\.(\d+)\.(\w+))"
    r"\.lora_([AB])\.weight$"
)


def _check_config(name: str, config: dict, spec: LoRATargetSpec) -> tuple[int, int, dict, str]:
    strategy = config.get("routing_strategy", "mixlora")
    if strategy in UNSUPPORTED_STRATEGIES:
        raise AdapterFormatError(
            f"adapter {name!r}: routing_strategy {strategy!r} is not supported: "
            f"{UNSUPPORTED_STRATEGIES[strategy]}; retrain with 'mixlora' (top-k)"
        )
    if strategy not in ("mixlora", "mixtral"):
        raise AdapterFormatError(
            f"adapter {name!r}: unknown routing_strategy {strategy!r} (expected 'mixlora', or the legacy 'mixtral')"
        )
    expert_config = config.get("expert_lora") or {}
    if not isinstance(expert_config, dict):
        raise AdapterFormatError(f"adapter {name!r}: `expert_lora` must be an object")
    moe.reject_dora(name, config, expert_config)
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"adapter {name!r}: trained biases (bias={config['bias']!r}) are not supported")
    act_fn = config.get("act_fn") or spec.hidden_act
    if act_fn not in ACT2FN:
        raise AdapterFormatError(f"adapter {name!r}: unknown act_fn {act_fn!r}")
    num_experts, top_k = moe.experts_and_top_k(name, config)
    return num_experts, top_k, {**config, **expert_config}, act_fn


def parse(
    name: str, config: dict, tensors: dict[str, torch.Tensor], spec: LoRATargetSpec, max_rank: int
) -> AdapterWeights:
    num_experts, top_k, expert_config, act_fn = _check_config(name, config, spec)
    d = spec.shapes["gate_proj"][0]
    shared: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    routers: dict[tuple[int, str], torch.Tensor] = {}
    found: moe.Found = {}
    for key, tensor in tensors.items():
        if m := _ATTN.match(key):
            layer, module, which = int(m.group(1)), m.group(2), m.group(3)
            check_place(name, key, layer, module, spec)
            if any(part in FFN_MODULES for part in spec.parts(module)):
                raise AdapterFormatError(f"adapter {name!r}: {key!r} puts a shared LoRA on an FFN projection")
            shared.setdefault((layer, module), {})[which] = tensor
        elif m := _ROUTER.match(key):
            layer = int(m.group(1))
            check_place(name, key, layer, "gate_proj", spec)
            routers[(layer, FFN_ROUTER)] = moe.checked_router(name, f"layers.{layer}.mlp", tensor, num_experts, d)
        elif m := _EXPERT.match(key):
            layer = int(m.group(1))
            module = m.group(2) or m.group(5)
            module = LEGACY_NAMES.get(module, module)
            check_place(name, key, layer, module, spec)
            if not all(part in FFN_MODULES for part in spec.parts(module)):
                raise AdapterFormatError(f"adapter {name!r}: expert tensor {key!r} is not on an FFN projection")
            found.setdefault((layer, module, int(m.group(3) or m.group(4))), {})[m.group(6)] = tensor
        else:
            raise AdapterFormatError(
                f"adapter {name!r}: unexpected tensor {key!r} (a MixLoRA holds mixlora.layers.* "
                "attention LoRAs, routers and FFN experts)"
            )
    if not routers:
        raise AdapterFormatError(f"adapter {name!r}: no router (mixlora.layers.{{L}}.mlp.moe_gate.weight) found")
    for layer in sorted({layer for layer, _, _ in found}):
        if (layer, FFN_ROUTER) not in routers:
            raise AdapterFormatError(
                f"adapter {name!r}: layers.{layer} has FFN experts but no router "
                f"(mixlora.layers.{layer}.mlp.moe_gate.weight)"
            )
    experts, rank = moe.checked_experts(name, found, num_experts, spec, max_rank, expert_config)
    modules, shared_rank = checked_modules(name, shared, spec, max_rank, config)
    rank = max(rank, shared_rank)
    return AdapterWeights(
        name=name,
        rank=rank,
        modules=modules,
        config=config,
        kind="mixlora",
        moe=MoEWeights(num_experts, top_k, experts, routers, ffn=True, act_fn=act_fn),
    )
