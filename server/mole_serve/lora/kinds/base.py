"""The contract every adapter kind meets, and what an adapter may target in the base model.

A kind module (lora, melora, mixlora, moelora) states: the `peft_type` values it reads, `parse`
(config + tensors -> validated weights, scaling folded in), `pack` (weights -> one pool slot of
the stacks) and `reference_delta` (the naive per-module output, the tests' oracle). Reading the
files is the library's job; nothing here touches disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from mole_serve.errors import InvalidAdapter

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Modules that read the same input share one A stack (one gather, one shrink); the model fuses
# their base weights in this order too.
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
# Modules some checkpoints store fused (Phi-3), in our fused layout: a PEFT LoRA on one (A [r, d_in],
# B [sum of the parts' d_out, r]) is exactly its parts' LoRAs, each with the same A and its rows of B.
FUSED_MODULES: dict[str, tuple[str, ...]] = {"qkv_proj": MODULE_GROUPS["qkv"], "gate_up_proj": MODULE_GROUPS["gate_up"]}


class AdapterFormatError(InvalidAdapter):
    """An adapter's files do not describe an adapter this server can serve; names the adapter."""


@dataclass(frozen=True)
class LoRATargetSpec:
    """What an adapter may target in the base model: module -> (d_in, d_out), per layer."""

    num_layers: int
    shapes: dict[str, tuple[int, int]]
    hidden_act: str = "silu"  # the FFN's activation (MixLoRA's experts default to it)
    dtype: torch.dtype = torch.float32  # what the pool's stacks hold the factors in (the base model's)
    # the fused modules the base model's checkpoint has (FUSED_MODULES' entries), which PEFT adapters name
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def parts(self, module: str) -> tuple[str, ...]:
        """The modules of `shapes` a target stands for: a fused module's parts (in its output's
        order), any other module itself."""
        return self.fused.get(module, (module,))

    def module_shape(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of a module of `shapes` or of a fused one (its parts' outputs stacked)."""
        parts = self.parts(module)
        return self.shapes[parts[0]][0], sum(self.shapes[m][1] for m in parts)


# The largest |(s B A)_ij| an adapter's update may have. Inputs to the adapted projections are
# normalized hidden states (RMSNorm: a root mean square of order one) or activations formed from them, and
# the base weights they meet have entries well under one; a trained LoRA's update is a correction
# smaller still. One entry of 1e3 adds a thousand times a unit input feature to an output, more
# than the whole normalized hidden state carries: no adapter trained by gradient descent gets
# there, while the broken ones (a lora_alpha of 1e300, weights of 1e30, an overflowing scaling)
# are orders past it. No static bound makes every activation finite (that depends on the
# input), but this one keeps any delta from dwarfing what the base model computes.
MAX_DELTA_ENTRY = 1e3


def check_runnable(name: str, where: str, A: torch.Tensor, B: torch.Tensor, scaling: float, dtype: torch.dtype) -> None:
    """What the server will run of one LoRA, checked: A [r, d_in] and B [d_out, r] with `scaling`
    folded in (fp32) must be finite, fit `dtype` (the pool's: float16 overflows past 65504), and
    give an update B A whose entries stay within MAX_DELTA_ENTRY. Every kind calls this on each
    pair it parses, after folding its scaling in, and so does a static merge on what it built."""
    if not math.isfinite(scaling) or abs(scaling) > torch.finfo(torch.float32).max:
        raise AdapterFormatError(
            f"adapter {name!r}: {where} has scaling {scaling!r} (lora_alpha or alpha_pattern over the rank), "
            "which is not a finite float32 number"
        )
    limit = torch.finfo(dtype).max
    for factor, what in ((A, "lora_A"), (B, f"lora_B (scaled by {scaling:.3g})")):
        peak = factor.abs().amax().item()  # NaN when any entry is (amax propagates it)
        if not math.isfinite(peak):
            raise AdapterFormatError(f"adapter {name!r}: {where} holds non-finite values (NaN or Inf) in {what}")
        if peak > limit:
            raise AdapterFormatError(
                f"adapter {name!r}: {where} has an entry of {peak:.3g} in {what}, past the largest {dtype} "
                f"({limit:.3g}) the server runs it in"
            )
    # Cauchy-Schwarz: |(B A)_ij| <= |B_i,:| |A_:,j|, O(r (d_in + d_out)); the product itself only when
    # that bound is over, so an adapter is refused for what it computes, not for a loose bound.
    bound = (B.norm(dim=1).max() * A.norm(dim=0).max()).item()
    if bound > MAX_DELTA_ENTRY:
        peak = (B @ A).abs().max().item()  # [d_out, d_in]
        if not peak <= MAX_DELTA_ENTRY:  # NaN (inf - inf in the product) is refused too
            raise AdapterFormatError(
                f"adapter {name!r}: {where} has an update B A with an entry of {peak:.3g}; "
                f"the limit is {MAX_DELTA_ENTRY:.0e} (lora_alpha or the weights are far too large)"
            )


@dataclass
class AdapterWeights:
    """A parsed adapter of some kind, ready to pack into a pool slot."""

    name: str
    rank: int  # largest rank over its modules: the stacks' rank must be at least this
    # (layer, module) -> (A [r, d_in], B [d_out, r] with the scaling folded in)
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    config: dict = field(default_factory=dict)
    kind: str = "lora"
    # The kind's native form where it differs from `modules` (melora: per module, A [n, r, d_in/n]
    # and B [n, d_out/n, r] of its n mini LoRAs, scaling folded in); None for a plain LoRA.
    blocks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None = None
    moe: MoEWeights | None = None  # the experts and routers of a mixture-of-LoRA-experts kind


# The router key of an FFN-wide router (MixLoRA's one per layer, on the FFN input) in MoEWeights.routers.
FFN_ROUTER = "mlp"


@dataclass
class MoEWeights:
    """A mixture of LoRA experts: E experts, each a plain LoRA over some modules, and top-k
    routers. `AdapterWeights.modules` holds the part every expert shares (MixLoRA's attention
    LoRAs). Per token, a router picks k experts and weighs them (softmax over its E logits, top-k,
    renormalized over the k).

    ffn=False (MoELoRA, MoE-PEFT's MoLA): a router per routed module on that module's input,
        y = W x + sum_topk w_e B_e A_e x.
    ffn=True (MixLoRA): one router per layer on the FFN input; each expert is the whole FFN with
        its own gate/up/down LoRAs over the shared base weights,
        y = sum_topk w_e FFN_e(x),  FFN_e(x) = (W_d + B_d,e A_d,e)(act(g_e) * u_e)."""

    num_experts: int
    top_k: int
    experts: list[dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]  # per expert: as `modules`
    routers: dict[tuple[int, str], torch.Tensor]  # (layer, module or FFN_ROUTER) -> W_g [E, d_in], fp32
    ffn: bool
    act_fn: str = "silu"
    renormalize: bool = True  # divide the k kept probabilities by their sum

    def expert(self, e: int, name: str) -> AdapterWeights:
        """Expert e as a plain LoRA (what packs into one pool slot), at its own rank."""
        return AdapterWeights(name=f"{name}#expert{e}", rank=held_rank(self.experts[e]), modules=self.experts[e])


def held_rank(modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> int:
    """The largest rank over LoRA pairs (A [r, d_in], B [d_out, r]); 0 for none: the rank rows of a
    slot that holds them (every row past it is zero)."""
    return max((A.shape[0] for A, _ in modules.values()), default=0)


def pinned(weights: AdapterWeights) -> AdapterWeights:
    """A copy whose tensors sit in page-locked host memory: packing it into CUDA stacks is then an
    asynchronous copy (non_blocking) instead of a staged, blocking one. CUDA only."""

    def pin(pairs: dict) -> dict:
        return {key: tuple(t.pin_memory() for t in pair) for key, pair in pairs.items()}

    moe = weights.moe and replace(
        weights.moe,
        experts=[pin(e) for e in weights.moe.experts],
        routers={key: W.pin_memory() for key, W in weights.moe.routers.items()},
    )
    return replace(weights, modules=pin(weights.modules), blocks=weights.blocks and pin(weights.blocks), moe=moe)


class AdapterKind(Protocol):
    PEFT_TYPES: tuple[str, ...]

    def parse(
        self, name: str, config: dict, tensors: dict[str, torch.Tensor], spec: LoRATargetSpec, max_rank: int
    ) -> AdapterWeights: ...

    def pack(self, weights: AdapterWeights, groups: dict, layer: int, slot: int, rank: int) -> None: ...

    def reference_delta(
        self, weights: AdapterWeights, layer: int, module: str, x: torch.Tensor
    ) -> torch.Tensor | None: ...
