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

from mole_serve.lora.backends.base import LoRABackend
from mole_serve.lora.batch import as_range, take_rows
from mole_serve.lora.kinds.base import FFN_ROUTER, MODULE_GROUPS, AdapterWeights, held_rank
from mole_serve.lora.stacks import GroupStack, LayerStacks


@dataclass
class ResidentExperts:
    """A MoE-kind adapter resident in the pool: its slots and its routers on the device."""

    primary: torch.Tensor  # [1] its own slot: the LoRAs all experts share (MixLoRA's attention)
    primary_range: tuple[int, int]
    slots: torch.Tensor  # [E] the experts' slots
    slot_range: tuple[int, int] | None  # (s0, s1) when slots == arange(s0, s1): views, not gathers
    rank: int  # the largest of its experts' ranks: what the expert ops run at
    shared_rank: int  # the shared LoRAs' (0: none)
    # per layer: group -> (W_g of its modules stacked [n*E, d_in] fp32, zero where a module has no
    # router; which modules do [n] bool): one GEMM routes a group; or FFN_ROUTER -> (W_g [E, d], None)
    routers: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]]
    shared_groups: frozenset[str]  # groups where the shared LoRAs have a module
    top_k: int
    ffn: bool
    act: Callable[[torch.Tensor], torch.Tensor]
    renormalize: bool

    @classmethod
    def build(
        cls, weights: AdapterWeights, primary: int, slots: list[int], num_layers: int, device: torch.device
    ) -> ResidentExperts:
        moe = weights.moe
        assert moe is not None  # the pool builds these for MoE-kind adapters only
        routers: list[dict] = [{} for _ in range(num_layers)]
        for layer in range(num_layers):
            if (layer, FFN_ROUTER) in moe.routers:
                routers[layer][FFN_ROUTER] = (moe.routers[(layer, FFN_ROUTER)].to(device, non_blocking=True), None)
            for group, modules in MODULE_GROUPS.items():
                per_module = [moe.routers.get((layer, m)) for m in modules]
                routed = [W is not None for W in per_module]
                if any(routed):
                    zero = torch.zeros_like(next(W for W in per_module if W is not None))
                    stacked = torch.cat([zero if W is None else W for W in per_module])  # [n*E, d_in]
                    routers[layer][group] = (stacked.to(device, non_blocking=True), torch.tensor(routed, device=device))
        shared = frozenset(g for g, modules in MODULE_GROUPS.items() if any(m in modules for _, m in weights.modules))
        return cls(
            torch.tensor([primary], device=device),
            (primary, primary + 1),
            torch.tensor(slots, device=device),
            as_range(slots),
            max(map(held_rank, moe.experts)),
            held_rank(weights.modules),
            routers,
            shared,
            moe.top_k,
            moe.ffn,
            ACT2FN[moe.act_fn],
            moe.renormalize,
        )

    @property
    def num_experts(self) -> int:
        return len(self.slots)


def route(
    x: torch.Tensor, W_g: torch.Tensor, num_experts: int, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d_in], W_g [n*E, d_in] (n routers on the same input) -> (weights [T, n, k] fp32, experts [T, n, k])."""
    probs = torch.softmax((x.float() @ W_g.t()).view(len(x), -1, num_experts), dim=-1)  # [T, n, E]
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
    # [Tm] bool, the rows that are this adapter's: a static decode step's rows are all of the bucket's,
    # and the others add nothing (None: every row is)
    row_mask: torch.Tensor | None = None
    # the decode rows' routing of every router this step, as (weights [R, n, k], experts [R, n, k],
    # which of the n routers count [n] or None): summed into `usage` once, after the forward
    routed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    _down: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def for_step(
        cls, experts: ResidentExperts, seqs: list[int], starts: list[int], num_tokens: list[int], num_decode: int
    ) -> ExpertRows:
        device = experts.slots.device
        rows = [r for i in seqs for r in range(starts[i], starts[i] + num_tokens[i])]
        seq_of_row = [j for j, i in enumerate(seqs) for _ in range(num_tokens[i])]
        return cls(
            experts,
            torch.tensor(rows, device=device),
            as_range(rows),
            torch.tensor(seq_of_row, device=device),
            seqs,
            sum(1 for i in seqs if i < num_decode),
        )

    def _take(self, t: torch.Tensor) -> torch.Tensor:
        return take_rows(t, self.rows, self.row_range)

    def usage(self) -> torch.Tensor:
        """[len(seqs), E]: each sequence's routing weight per expert, summed over its decode rows,
        the layers and the routers."""
        n, E = self.usage_rows, self.experts.num_experts
        total = torch.zeros(len(self.seqs), E, device=self.rows.device)
        for weights, experts, counts in self.routed:
            if counts is not None:
                weights = weights * counts.view(1, -1, 1)
            dense = weights.new_zeros(n, E).scatter_add_(1, experts.reshape(n, -1), weights.reshape(n, -1))
            total.index_add_(0, self.seq_of_row[:n], dense)
        return total

    def _record(self, weights: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor | None) -> None:
        if self.usage_rows:
            n = self.usage_rows
            if self.row_mask is not None:
                weights = weights * self.row_mask[:, None, None]
            self.routed.append((weights[:n], experts[:n], counts))

    def apply(
        self, backend: LoRABackend, layer: int, group: str, stack: GroupStack, x: torch.Tensor, out: torch.Tensor
    ) -> None:
        """out += this adapter's part of the group for its rows: the shared LoRAs, the per-module
        experts (MoELoRA), or the down projection of each FFN expert's activation (MixLoRA)."""
        ex = self.experts
        per_module = not ex.ffn and group in ex.routers[layer]
        down = self._down if ex.ffn and group == "down" else None
        if group not in ex.shared_groups and not per_module and down is None:
            return
        xr = self._take(x)
        in_place = self.row_range is not None and self.row_mask is None
        target = self._take(out) if in_place else out.new_zeros(len(xr), out.shape[1])
        if group in ex.shared_groups:
            backend.apply_experts(xr, target, stack, ex.primary, ex.primary_range, ex.shared_rank, None)
        if per_module:
            W_g, routed = ex.routers[layer][group]
            assert routed is not None  # only the FFN router's entry has None
            top, experts = route(xr, W_g, ex.num_experts, ex.top_k, ex.renormalize)  # [Tm, n, k]
            self._record(top, experts, routed)
            # [Tm, n, E], zero for unselected experts and for the group's modules without a router
            weights = top.new_zeros(*top.shape[:2], ex.num_experts).scatter_(-1, experts, top) * routed.view(1, -1, 1)
            backend.apply_experts(xr, target, stack, ex.slots, ex.slot_range, ex.rank, weights.to(xr.dtype))
        if down is not None:
            activations, weights, experts = down
            backend.apply_routed_inputs(
                activations, target, stack, ex.slots, ex.slot_range, ex.rank, experts, weights.to(activations.dtype)
            )
            self._down = None
        if in_place:
            return
        if self.row_mask is not None:
            target = target * self.row_mask[:, None]
        if self.row_range:
            self._take(out).add_(target)
        else:
            out.index_add_(0, self.rows, target)

    def mix_ffn(
        self,
        backend: LoRABackend,
        layer: int,
        stacks: LayerStacks,
        h: torch.Tensor,
        gate_up: torch.Tensor,
        act: torch.Tensor,
    ) -> None:
        """MixLoRA: act[rows] (the base FFN's activation, in place) becomes the router's mixture of
        the selected experts' activations; each expert's own activation is kept for `apply` at the
        down projection. h: [T, d] the FFN input; gate_up: [T, 2I] its base projection."""
        ex = self.experts
        W_g, _ = ex.routers[layer].get(FFN_ROUTER, (None, None)) if ex.ffn else (None, None)
        if W_g is None:
            return
        hr, base = self._take(h), self._take(gate_up)
        weights, experts = route(hr, W_g, ex.num_experts, ex.top_k, ex.renormalize)
        self._record(weights, experts, None)
        weights, experts = weights[:, 0], experts[:, 0]  # [Tm, k]: the one router
        gate_k, up_k = backend.selected_expert_outputs(hr, stacks["gate_up"], ex.slots, ex.slot_range, ex.rank, experts)
        inter = gate_k.shape[-1]
        gate = base[:, None, :inter] + gate_k  # [Tm, k, I]
        up = base[:, None, inter:] + up_k
        activations = ex.act(gate) * up  # [Tm, k, I]: each selected expert's
        mixture = (weights.to(act.dtype).unsqueeze(-1) * activations).sum(1)  # [Tm, I]
        if self.row_mask is not None:
            mixture = torch.where(self.row_mask[:, None], mixture, self._take(act))
        if self.row_range:
            self._take(act).copy_(mixture)
        else:
            act.index_copy_(0, self.rows, mixture)
        self._down = (activations, weights, experts)
