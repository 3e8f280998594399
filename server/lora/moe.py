"""Mixtures of LoRA experts in the batch (kinds mixlora, moelora): an adapter's own routers turn
each token into per-expert weights, and the experts, E plain LoRAs in E pool slots, run through
the backend on those weights. A request names such an adapter alone, so its tokens form their own
rows of the step, one ExpertRows per adapter (not per request: all of an adapter's requests share
one routed GEMM, as SGMV's segments do); everything else in the step runs as usual beside them.

Routing is exactly the authors' (MoE-PEFT, the `mixlora` package): logits in fp32, softmax over
E, top-k, the k renormalized. Unselected experts get weight 0 and run as part of one dense GEMM
over the adapter's E slots: at LoRA ranks that is cheaper than gathering each token's k experts.

MixLoRA's FFN experts (ffn=True) need each selected expert's own activation. Per token t with
selected experts e and weights w_e, and the base FFN's gate/up output computed once:
    g_e = W_g h + B^g_e A^g_e h,  u_e = W_u h + B^u_e A^u_e h,  a_e = act(g_e) * u_e   [k, I]
    y   = W_d (sum_e w_e a_e) + sum_e w_e B^d_e A^d_e a_e
since the down projection is linear: the base down GEMM runs once, on the mixture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.activations import ACT2FN

from server.lora.backends.base import LoRABackend
from server.lora.kinds.base import FFN_ROUTER, MODULE_GROUPS, AdapterWeights
from server.lora.stacks import GroupStack, LayerStacks


@dataclass
class ResidentExperts:
    """A MoE-kind adapter resident in the pool: its slots and its routers on the device."""

    primary: torch.Tensor  # [1] its own slot: the LoRAs all experts share (MixLoRA's attention)
    primary_range: tuple[int, int]
    slots: torch.Tensor  # [E] the experts' slots
    slot_range: tuple[int, int] | None  # (s0, s1) when slots == arange(s0, s1): views, not gathers
    routers: list[dict[str, torch.Tensor]]  # per layer: module (or FFN_ROUTER) -> W_g [E, d_in], fp32
    shared_groups: frozenset[str]  # groups where the shared LoRAs have a module
    top_k: int
    ffn: bool
    act: Callable[[torch.Tensor], torch.Tensor]
    renormalize: bool

    @classmethod
    def build(cls, weights: AdapterWeights, primary: int, slots: list[int], num_layers: int,
              device: torch.device) -> ResidentExperts:
        moe = weights.moe
        routers: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
        for (layer, module), W in moe.routers.items():
            routers[layer][module] = W.to(device)
        shared = frozenset(g for g, modules in MODULE_GROUPS.items()
                           if any(m in modules for _, m in weights.modules))
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        return cls(torch.tensor([primary], device=device), (primary, primary + 1), torch.tensor(slots, device=device),
                   (slots[0], slots[-1] + 1) if contiguous else None, routers, shared, moe.top_k, moe.ffn,
                   ACT2FN[moe.act_fn], moe.renormalize)

    @property
    def num_experts(self) -> int:
        return len(self.slots)


def route(x: torch.Tensor, W_g: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d_in] -> (weights [T, k] fp32, experts [T, k])."""
    probs = torch.softmax(x.float() @ W_g.t(), dim=-1)  # [T, E]
    weights, experts = probs.topk(top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True) if renormalize else weights), experts


@dataclass
class ExpertRows:
    """The step's token rows on one MoE-kind adapter, and what its routers did to them."""

    experts: ResidentExperts
    rows: torch.Tensor  # [Tm] token rows of the step, ascending
    row_range: tuple[int, int] | None  # (r0, r1) when rows == arange(r0, r1)
    seq_of_row: torch.Tensor  # [Tm] index of each row's sequence in `seqs`
    seqs: list[int]  # the step's sequence indices on this adapter
    usage_rows: int  # the first rows are decode rows (generated tokens): expert usage counts these
    usage: torch.Tensor  # [len(seqs), E] routing weight per expert, summed over layers, routers and rows
    _down: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def for_step(cls, experts: ResidentExperts, seqs: list[int], starts: list[int], num_tokens: list[int],
                 num_decode: int) -> ExpertRows:
        device = experts.slots.device
        rows = [r for i in seqs for r in range(starts[i], starts[i] + num_tokens[i])]
        seq_of_row = [j for j, i in enumerate(seqs) for _ in range(num_tokens[i])]
        contiguous = rows == list(range(rows[0], rows[-1] + 1))
        return cls(experts, torch.tensor(rows, device=device), (rows[0], rows[-1] + 1) if contiguous else None,
                   torch.tensor(seq_of_row, device=device), seqs, sum(1 for i in seqs if i < num_decode),
                   torch.zeros(len(seqs), experts.num_experts, device=device))

    def _take(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.row_range[0] : self.row_range[1]] if self.row_range else t.index_select(0, self.rows)

    def _count(self, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Add the decode rows' routing to the usage; the weights as dense [Tm, E]."""
        dense = weights.new_zeros(len(weights), self.experts.num_experts).scatter_(1, experts, weights)
        n = self.usage_rows
        if n:
            self.usage.index_add_(0, self.seq_of_row[:n], dense[:n])
        return dense

    def apply(self, backend: LoRABackend, layer: int, group: str, stack: GroupStack, x: torch.Tensor,
              out: torch.Tensor) -> None:
        """out += this adapter's part of the group for its rows: the shared LoRAs, the per-module
        experts (MoELoRA), or the down projection of each FFN expert's activation (MixLoRA)."""
        ex = self.experts
        per_module = not ex.ffn and any(m in ex.routers[layer] for m in MODULE_GROUPS[group])
        down = ex.ffn and group == "down" and self._down is not None
        if group not in ex.shared_groups and not per_module and not down:
            return
        xr = self._take(x)
        target = out[self.row_range[0] : self.row_range[1]] if self.row_range else out.new_zeros(len(xr), out.shape[1])
        if group in ex.shared_groups:
            backend.apply_experts(xr, target, stack, ex.primary, ex.primary_range, None)
        if per_module:
            weights = xr.new_zeros(len(xr), len(stack.B), ex.num_experts)  # [Tm, n, E]
            for j, module in enumerate(MODULE_GROUPS[group]):
                if module in ex.routers[layer]:
                    weights[:, j] = self._count(*route(xr, ex.routers[layer][module], ex.top_k, ex.renormalize))
            backend.apply_experts(xr, target, stack, ex.slots, ex.slot_range, weights)
        if down:
            activations, weights, experts = self._down
            backend.apply_routed_inputs(activations, target, stack, ex.slots, ex.slot_range, experts,
                                        weights.to(activations.dtype))
            self._down = None
        if not self.row_range:
            out.index_add_(0, self.rows, target)

    def mix_ffn(self, backend: LoRABackend, layer: int, stacks: LayerStacks, h: torch.Tensor,
                gate_up: torch.Tensor, act: torch.Tensor) -> None:
        """MixLoRA: act[rows] (the base FFN's activation, in place) becomes the router's mixture of
        the selected experts' activations; each expert's own activation is kept for `apply` at the
        down projection. h: [T, d] the FFN input; gate_up: [T, 2I] its base projection."""
        ex = self.experts
        W_g = ex.routers[layer].get(FFN_ROUTER) if ex.ffn else None
        if W_g is None:
            return
        hr, base = self._take(h), self._take(gate_up)
        weights, experts = route(hr, W_g, ex.top_k, ex.renormalize)  # [Tm, k]
        self._count(weights, experts)
        gate_all, up_all = backend.expert_outputs(hr, stacks["gate_up"], ex.slots, ex.slot_range)  # [Tm, E, I]
        inter = gate_all.shape[-1]
        pick = experts.unsqueeze(-1).expand(-1, -1, inter)  # [Tm, k, I]
        gate = base[:, None, :inter] + gate_all.gather(1, pick)
        up = base[:, None, inter:] + up_all.gather(1, pick)
        activations = ex.act(gate) * up  # [Tm, k, I]: each selected expert's
        mixture = (weights.to(act.dtype).unsqueeze(-1) * activations).sum(1)  # [Tm, I]
        if self.row_range:
            act[self.row_range[0] : self.row_range[1]] = mixture
        else:
            act.index_copy_(0, self.rows, mixture)
        self._down = (activations, weights, experts)
