"""The per-layer router: MoLE gating in RAMoLE's RouterLoRA form (docs/architecture.md section 4).

Per decoder layer l, router matrices Ar: [rg, d] and Br: [d_probe, rg]. A candidate adapter i
with output v_i = B_i A_i x at the layer's probe group (the fused q/k/v projection) scores

    s_i = <Ar x, Br^T v_i> / sqrt(rg) = <Ar x, M_i z_i> / sqrt(rg),   M_i = Br^T B_i: [rg, n*r]

so the score needs only the rank-space shrink z_i = A_i x the LoRA op computes anyway, plus M_i,
computed once when the adapter enters a pool slot (stored transposed, [n*r, rg]). Weights are
softmax(s / tau) over the request's own candidates, and apply to every adapted module of the
layer. No per-adapter parameters: adapters uploaded after training are scored the same way.

LoRA outputs are tiny next to the hidden state, so raw scores start near 0 and the gate can't
leave the uniform mixture in a few hundred steps. Both sides are therefore scaled to unit RMS
(Ar x, and each Br^T v_i on its own, so a candidate's score doesn't depend on which others are
present and masking renormalizes exactly), with a learned gain per layer setting the sharpness.

The request's prior weights (the retrieval mixture: softmax of cosine scores; or the caller's
weights) enter as a learned per-layer multiple of their log, so the gate starts as the mixture
and learns where to sharpen it or move away from it:

    w = softmax((gain_l * s + beta_l * log prior) / tau)   over the request's candidates
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mole_serve.lora.batch import LoRABatchInfo
from mole_serve.lora.kinds.base import MODULE_GROUPS, LoRATargetSpec
from mole_serve.lora.stacks import GroupStack, LayerStacks

PROBE_GROUP = "qkv"
EXTRA_COLUMNS = 2  # GateStats.sums' columns after the candidates': the base column's share, the entropy


@dataclass
class GateConfig:
    base_model: str  # the base the gate (and its library) was trained on
    num_layers: int
    hidden_size: int  # d: input of the probe group
    probe_size: int  # d_probe: output width of the probe group
    rank: int = 16  # rg
    temperature: float = 1.0
    # LoRA-Flow's fusion form (docs/composition.md): a base column, a share of the weight that goes to
    # no adapter, and a learned bias per prior rank added after the softmax, so the weights need not
    # sum to 1. Off: MoLE's softmax over the candidates (what gates saved before it load as).
    fusion: bool = False
    max_candidates: int = 4  # the prior ranks the bias covers (a request's candidates past it share the last)
    # fusion: the bias times the token's base-column share, so it is spent where the gate leaves the
    # adapters (a part boundary) and not inside a part, where a constant bias keeps every candidate
    # mixed in (docs/composition.md). Off: a constant bias, as LoRA-Flow's.
    bias_by_base: bool = False

    @classmethod
    def for_base(cls, base_model: str, spec: LoRATargetSpec, **options) -> GateConfig:
        probe = [spec.shapes[m] for m in MODULE_GROUPS[PROBE_GROUP]]
        return cls(base_model, spec.num_layers, probe[0][0], sum(d_out for _, d_out in probe), **options)


@dataclass
class GateStats:
    """What the gate did in one step: per sequence, its weight per column and its entropy summed
    over layers and tokens (the response's gate_weight, train-gate's balance loss)."""

    gated: torch.Tensor  # [T] bool, tokens whose weights the gate computes
    token_seq: torch.Tensor  # [T] sequence index of each token
    sums: torch.Tensor  # [N, C + 2]: gate weights per column, the base column's share, the entropy, summed
    seq_columns: list[list[int]] | None  # per sequence, its K slots' columns (dense path)
    # train-gate sets a list here to get every layer's per-token gate weights, then the base
    # column's share ([T, C + 1] each)
    layer_weights: list[torch.Tensor] | None = None

    @classmethod
    def for_batch(cls, batch: LoRABatchInfo, gated: Sequence[bool], num_tokens: Sequence[int]) -> GateStats | None:
        """None when no sequence of the step is gated."""
        if not any(gated):
            return None
        counts, device = torch.tensor(list(num_tokens)), batch.lora_slots.device
        return cls(
            torch.tensor(list(gated)).repeat_interleave(counts).to(device),
            torch.arange(len(gated)).repeat_interleave(counts).to(device),
            torch.zeros(len(gated), batch.num_columns + EXTRA_COLUMNS, dtype=torch.float32, device=device),
            batch.seq_columns,
        )

    def record(self, rows: slice, weights: torch.Tensor, base: torch.Tensor, distribution: torch.Tensor) -> None:
        """Add one layer's gate weights [R, C] of token rows, the base column's share [R] and the
        entropy of the softmax they came from ([R, C] or [R, C + 1]) to the per-sequence sums."""
        entropy = -(distribution * distribution.clamp_min(1e-12).log()).sum(-1, keepdim=True)  # [R, 1]
        stats = torch.cat([weights, base[:, None], entropy], dim=1) * self.gated[rows, None]
        # Not detached: train_gate's balance loss is computed from these sums.
        self.sums.index_add_(0, self.token_seq[rows], stats.to(self.sums.dtype))
        if self.layer_weights is not None:
            self.layer_weights.append(torch.cat([weights, base[:, None]], dim=1))

    def seq_sums(self, i: int) -> torch.Tensor:
        """Sequence i's sums over layers and tokens: its K adapters' weights in its own slot
        order, the base column's share, then the entropy. [K + 2]"""
        row = self.sums[i]
        if self.seq_columns is None:
            return row
        C = row.shape[0] - EXTRA_COLUMNS
        cols = torch.tensor([*self.seq_columns[i], C, C + 1], device=row.device)
        return row.index_select(0, cols)

    def totals(self) -> list[list[float]]:
        """seq_sums of every sequence, as numbers (one read of the device where the columns are
        the sequences' own)."""
        if self.seq_columns is None:
            return self.sums.tolist()
        return [self.seq_sums(i).tolist() for i in range(self.sums.shape[0])]


@dataclass
class LayerGate:
    """One layer's router as the LoRA op uses it."""

    query: torch.Tensor  # Ar: [rg, d]
    keys: torch.Tensor  # [slots, n*r, rg]: M_i^T of every pool slot
    gain: torch.Tensor  # [] learned sharpness of the router's scores
    prior_scale: torch.Tensor  # [] beta: weight of the log prior
    temperature: float
    # the fusion form (GateConfig.fusion), else None: the base column's key [rg] and logit offset [],
    # and the bias per prior rank [max_candidates]
    base_key: torch.Tensor | None = None
    base_logit: torch.Tensor | None = None
    rank_bias: torch.Tensor | None = None
    bias_by_base: bool = False  # GateConfig.bias_by_base

    def weigh(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        slots: torch.Tensor,
        prior: torch.Tensor | None,
        stats: GateStats | None,
        rows: slice,
    ) -> torch.Tensor:
        """x: [R, d] probe input; z: [R, C, n*r] unweighted shrink against slots [C] or [R, C], at
        any rank r up to the keys' (the keys' rows past a slot's own rank are zero, as its B's are).
        prior: [R, C] weights, > 0 on the token's candidates (None: all 1). Gated rows (stats.gated)
        get softmax(s / tau) over their candidates; the others keep their prior. -> [R, C]."""
        R, C = z.shape[0], z.shape[1]
        rg, n = self.query.shape[0], len(MODULE_GROUPS[PROBE_GROUP])
        if prior is None:
            prior = torch.ones(R, C, dtype=z.dtype, device=z.device)
        candidates = prior > 0
        candidates = candidates | ~candidates.any(-1, keepdim=True)  # rows with none are not gated
        u = x @ self.query.t()  # [R, rg]
        u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + 1e-12)
        keys = self.keys.view(len(self.keys), n, -1, rg)[:, :, : z.shape[-1] // n]  # z's rank: [slots, n, r, rg]
        keys = keys.index_select(0, slots.reshape(-1)).view(*slots.shape, z.shape[-1], rg)  # [(R,) C, n*r, rg]
        kz = (z.unsqueeze(-2) @ keys).squeeze(-2)  # [R, C, rg] = Br^T v_i
        kz = kz * torch.rsqrt(kz.pow(2).mean(-1, keepdim=True) + 1e-12)
        scores = self.gain * (kz * u.unsqueeze(1)).sum(-1) / math.sqrt(rg)  # [R, C]
        scores = scores + self.prior_scale * prior.clamp_min(1e-12).log()
        logits = (scores / self.temperature).masked_fill(~candidates, float("-inf"))
        assert stats is not None  # the context passes a gate only with its step's stats
        if self.base_key is None or self.base_logit is None or self.rank_bias is None:
            weights = torch.softmax(logits, dim=-1)
            stats.record(rows, weights, weights.new_zeros(R), weights)
            return torch.where(stats.gated[rows, None], weights, prior)
        # the base column scores like a candidate whose key is learned, plus an offset
        kb = self.base_key * torch.rsqrt(self.base_key.pow(2).mean() + 1e-12)  # [rg], unit RMS
        base_logit = (self.gain * (u @ kb) / math.sqrt(rg) + self.base_logit) / self.temperature  # [R]
        distribution = torch.softmax(torch.cat([logits, base_logit[:, None]], dim=-1), dim=-1)  # [R, C + 1]
        # each candidate's rank by prior (0: the highest) picks its bias; non-candidates get none
        rank = prior.masked_fill(~candidates, float("-inf")).argsort(-1, descending=True).argsort(-1)  # [R, C]
        bias = self.rank_bias[rank.clamp(max=len(self.rank_bias) - 1)] * candidates
        if self.bias_by_base:
            bias = bias * distribution[:, C:]
        weights = distribution[:, :C] + bias
        stats.record(rows, weights, distribution[:, C], distribution)
        return torch.where(stats.gated[rows, None], weights, prior)


class MoLEGate(torch.nn.Module):
    """The trainable router of every layer (base model and LoRAs stay frozen)."""

    def __init__(self, config: GateConfig) -> None:
        super().__init__()
        self.config = config
        L, d, dp, rg = config.num_layers, config.hidden_size, config.probe_size, config.rank
        self.query = torch.nn.Parameter(torch.randn(L, rg, d) / math.sqrt(d))  # Ar per layer
        self.key = torch.nn.Parameter(torch.randn(L, dp, rg) / math.sqrt(dp))  # Br per layer
        # exp-parameterized so Adam's fixed-size steps move them by factors, not by 0.01s
        self.log_gain = torch.nn.Parameter(torch.full((L,), math.log(0.1)))  # router starts quiet
        self.log_prior_scale = torch.nn.Parameter(torch.zeros(L))  # starts as the prior mixture
        if config.fusion:
            self.base_key = torch.nn.Parameter(torch.randn(L, rg))
            # the base column starts with a small share (e^-3 against one candidate's e^0)
            self.base_logit = torch.nn.Parameter(torch.full((L,), -3.0))
            self.rank_bias = torch.nn.Parameter(torch.zeros(L, config.max_candidates))  # starts as softmax alone

    def slot_keys(self, layer: int, stack: GroupStack, slots: slice = slice(None)) -> torch.Tensor:
        """M_i^T = (Br^T B_i)^T for the slots of the layer's probe stack: [slots, n*r, rg]."""
        Br = self.key[layer].to(stack.B[0].dtype)
        # Module j's B_j [slots, r, d_j] meets the rows of Br for its output columns.
        return torch.cat([B[slots] @ Br[c0:c1] for B, (c0, c1) in zip(stack.B, stack.out_columns)], dim=1)

    def layer_gates(self, stacks: list[LayerStacks]) -> list[LayerGate]:
        """Per layer, the router for the op, with the keys of every slot."""
        dtype = stacks[0][PROBE_GROUP].A.dtype
        gain, prior_scale = self.log_gain.exp().to(dtype), self.log_prior_scale.exp().to(dtype)
        fusion = self.config.fusion
        return [
            LayerGate(
                self.query[layer].to(dtype),
                self.slot_keys(layer, groups[PROBE_GROUP]),
                gain[layer],
                prior_scale[layer],
                self.config.temperature,
                self.base_key[layer].to(dtype) if fusion else None,
                self.base_logit[layer].to(dtype) if fusion else None,
                self.rank_bias[layer].to(dtype) if fusion else None,
                self.config.bias_by_base,
            )
            for layer, groups in enumerate(stacks)
        ]


def balance_loss(mean_weights: torch.Tensor) -> torch.Tensor:
    """MoLE's balance loss -log prod_i q_i over N adapters, q normalized to sum 1 and scaled by N
    so that a uniform q gives 0. mean_weights: [N] each adapter's gate weight summed over the
    tokens (any common scale)."""
    q = mean_weights / mean_weights.sum()
    return -(q * len(q)).clamp_min(1e-9).log().mean()
