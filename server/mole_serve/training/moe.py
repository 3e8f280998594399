"""MixLoRA and MoELoRA training on a transformers Llama (the base frozen), written in the formats
the server reads (kinds/mixlora.py: MoE-PEFT's; kinds/moelora.py: MoE-PEFT's per-linear layout).

Init as PEFT / MoE-PEFT: A Kaiming-uniform, B zero (every expert starts as the base), routers
normal(0, 0.02). No dropout, no router jitter.

Losses, beside the answer cross-entropy:
- load balance, exactly MoE-PEFT's `_mixtral_load_balancing_loss_func`: every router's logits of
  the step concatenated [L*N, E] (padding dropped), p = softmax, f[k, e] = the fraction of tokens
  whose k-th choice is e, P[e] = mean p, loss = coef * E * sum_{k,e} f[k, e] * P[e].
- MoELoRA's contrastive loss (Luo et al. 2024: experts should learn distinct features; the paper's
  exact construction is not public in code): a supervised InfoNCE over the selected experts'
  outputs at each routed linear, labels = the expert, so outputs of one expert (across tokens) are
  positives and outputs of other experts negatives; temperature `tau`, on `contrastive_tokens`
  sampled tokens per linear and step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers.activations import ACT2FN

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


def _lora_init(E: int, r: int, d_in: int, d_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    A = torch.empty(E, r, d_in)
    for e in range(E):  # each expert's A as nn.Linear(d_in, r) would start
        nn.init.kaiming_uniform_(A[e], a=math.sqrt(5))
    return nn.Parameter(A), nn.Parameter(torch.zeros(E, d_out, r))


def top_k_weights(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] -> renormalized top-k weights [N, k] and experts [N, k]."""
    weights, experts = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), experts


class LoRALinear(nn.Module):
    """y = W x + s B A x (MixLoRA's shared attention LoRAs)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        A, B = _lora_init(1, r, base.in_features, base.out_features)
        self.base, self.scaling = base, alpha / r
        self.A, self.B = nn.Parameter(A.data[0]), nn.Parameter(B.data[0])  # [r, d_in], [d_out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.A.t() @ self.B.t())


class MoELoRALinear(nn.Module):
    """y = W x + sum_topk w_e s B_e A_e x, a router on this linear's input."""

    def __init__(self, base: nn.Linear, E: int, k: int, r: int, alpha: float) -> None:
        super().__init__()
        self.base, self.k, self.scaling = base, k, alpha / r
        self.router = nn.Parameter(torch.randn(E, base.in_features) * 0.02)
        self.A, self.B = _lora_init(E, r, base.in_features, base.out_features)  # [E, r, d_in], [E, d_out, r]
        self.logits: torch.Tensor | None = None  # [N, E] of the last forward (the balance loss)
        self.routed: tuple[torch.Tensor, torch.Tensor] | None = None  # (z [N, E, r], experts [N, k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, d_in]
        E, r = self.A.shape[0], self.A.shape[1]
        self.logits = flat.float() @ self.router.t()
        weights, experts = top_k_weights(self.logits, self.k)  # [N, k]
        z = (flat @ self.A.reshape(E * r, -1).t()).view(-1, E, r)  # [N, E, r]: every expert's shrink
        self.routed = (z, experts)
        dense = weights.new_zeros(len(flat), E).scatter(1, experts, weights).to(z.dtype)  # [N, E]
        delta = (z * dense.unsqueeze(-1)).reshape(len(flat), E * r) @ self.B_flat() * self.scaling
        return self.base(x) + delta.view(*x.shape[:-1], -1)

    def B_flat(self) -> torch.Tensor:
        """[E * r, d_out]: the experts' B stacked along the rank axis."""
        return self.B.transpose(1, 2).reshape(-1, self.B.shape[1])

    def selected_outputs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k selected experts' outputs at these token rows: ([R, k, d_out], experts [R, k])."""
        z, experts = self.routed
        picked = experts[rows]  # [R, k]
        z_k = z[rows].gather(1, picked.unsqueeze(-1).expand(-1, -1, z.shape[-1]))  # [R, k, r]
        return torch.einsum("rkq,rkoq->rko", z_k, self.B[picked]) * self.scaling, picked


class MixLoRAFFN(nn.Module):
    """MixLoRA's FFN: top-k of E experts, each the base SwiGLU FFN with its own gate/up/down LoRAs."""

    def __init__(self, mlp: nn.Module, E: int, k: int, r: int, alpha: float, act_fn: str) -> None:
        super().__init__()
        self.mlp, self.k, self.scaling, self.act = mlp, k, alpha / r, ACT2FN[act_fn]
        d, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        self.router = nn.Parameter(torch.randn(E, d) * 0.02)
        self.gate_A, self.gate_B = _lora_init(E, r, d, inter)
        self.up_A, self.up_B = _lora_init(E, r, d, inter)
        self.down_A, self.down_B = _lora_init(E, r, inter, d)
        self.logits: torch.Tensor | None = None

    def _selected(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Each token's k selected experts' LoRA outputs on x [N, d_in]: [N, k, d_out]. Every expert's
        shrink, then per k one expand over the one-hot rank blocks: GEMMs, no weight gathers."""
        E, r = A.shape[0], A.shape[1]
        z = (x @ A.reshape(E * r, -1).t()).view(-1, 1, E, r)  # [N, 1, E, r]
        z_k = (F.one_hot(experts, E).to(z.dtype).unsqueeze(-1) * z).reshape(-1, E * r)  # [N*k, E*r]
        return (z_k @ B.transpose(1, 2).reshape(E * r, -1)).view(len(x), self.k, -1) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, d]
        self.logits = flat.float() @ self.router.t()
        weights, experts = top_k_weights(self.logits, self.k)  # [N, k]
        E, r = self.down_A.shape[0], self.down_A.shape[1]
        gate = self.mlp.gate_proj(flat).unsqueeze(1) + self._selected(flat, self.gate_A, self.gate_B, experts)
        up = self.mlp.up_proj(flat).unsqueeze(1) + self._selected(flat, self.up_A, self.up_B, experts)
        h = self.act(gate) * up  # [N, k, I]: each selected expert's activation
        w = weights.to(h.dtype)
        # down: each (token, k) against every expert's A, keep its own expert's, weigh, then one expand
        z = (h.reshape(-1, h.shape[-1]) @ self.down_A.reshape(E * r, -1).t()).view(-1, self.k, E, r)
        own = z.gather(2, experts.view(-1, self.k, 1, 1).expand(-1, -1, 1, r)).squeeze(2) * w.unsqueeze(-1)
        per_expert = own.new_zeros(len(flat), E, r).scatter_add(1, experts.unsqueeze(-1).expand(-1, -1, r), own)
        down = per_expert.reshape(len(flat), E * r) @ self.down_B.transpose(1, 2).reshape(E * r, -1) * self.scaling
        y = self.mlp.down_proj((w.unsqueeze(-1) * h).sum(1)) + down  # the base down once, on the mixture
        return y.view_as(x)


def inject_moe(
    model: nn.Module, kind: str, targets: tuple[str, ...], E: int, k: int, r: int, alpha: float
) -> list[nn.Module]:
    """Put MixLoRA or MoELoRA modules into a Llama in place, freeze the rest; -> the routed modules."""
    for p in model.parameters():
        p.requires_grad_(False)
    routed: list[nn.Module] = []
    for layer in model.model.layers:
        for proj in ATTENTION:
            if proj in targets:
                base = getattr(layer.self_attn, proj)
                wrapped = LoRALinear(base, r, alpha) if kind == "mixlora" else MoELoRALinear(base, E, k, r, alpha)
                setattr(layer.self_attn, proj, wrapped)
                routed += [wrapped] if kind == "moelora" else []
        if kind == "mixlora":
            layer.mlp = MixLoRAFFN(layer.mlp, E, k, r, alpha, model.config.hidden_act)
            routed.append(layer.mlp)
        else:
            for proj in FFN:
                if proj in targets:
                    wrapped = MoELoRALinear(getattr(layer.mlp, proj), E, k, r, alpha)
                    setattr(layer.mlp, proj, wrapped)
                    routed.append(wrapped)
    return routed


def balance_loss(routed: list[nn.Module], mask: torch.Tensor, k: int, coef: float) -> torch.Tensor:
    """MoE-PEFT's load-balancing loss over every router's logits, concatenated. mask: [N] real tokens."""
    logits = torch.cat([m.logits[mask] for m in routed])  # [L*N, E]
    probs = torch.softmax(logits, dim=-1)
    E = probs.shape[-1]
    hits = F.one_hot(probs.topk(k, dim=-1).indices, E).float()  # [L*N, k, E]
    return coef * E * (hits.mean(0) * probs.mean(0)).sum()


def contrastive_loss(
    routed: list[MoELoRALinear], mask: torch.Tensor, tau: float, tokens: int, generator: torch.Generator
) -> torch.Tensor:
    """Supervised InfoNCE per routed linear: a selected expert's output against the outputs of the
    same expert (positives) and of other experts (negatives), on `tokens` sampled real tokens."""
    real = mask.nonzero().squeeze(1)
    losses = []
    for m in routed:
        outputs, experts = m.selected_outputs(real[torch.randperm(len(real), generator=generator)[:tokens]])
        z = F.normalize(outputs.reshape(-1, outputs.shape[-1]), dim=-1)  # [S, d_out]
        labels = experts.reshape(-1)  # [S]
        sim = z @ z.t() / tau
        self_pair = torch.eye(len(z), dtype=torch.bool)
        sim = sim.masked_fill(self_pair, float("-inf"))
        positive = (labels[:, None] == labels[None, :]) & ~self_pair
        log_prob = sim - sim.logsumexp(-1, keepdim=True)
        has = positive.any(-1)
        if has.any():
            losses.append(-(log_prob.masked_fill(~positive, 0).sum(-1)[has] / positive.sum(-1)[has]).mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())


def save_moe(
    model: nn.Module,
    kind: str,
    folder: Path,
    targets: tuple[str, ...],
    E: int,
    k: int,
    r: int,
    alpha: float,
    base_model: str,
    extra: dict,
) -> None:
    """MoE-PEFT's key layout (the mixlora package and the server read it); safetensors."""
    tensors: dict[str, torch.Tensor] = {}

    def put(prefix: str, A: torch.Tensor, B: torch.Tensor) -> None:
        tensors[f"{prefix}.lora_A.weight"] = A.detach().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.detach().contiguous()

    for L, layer in enumerate(model.model.layers):
        for proj in ATTENTION:
            m = getattr(layer.self_attn, proj)
            if isinstance(m, LoRALinear):
                put(f"mixlora.layers.{L}.self_attn.{proj}", m.A, m.B)
            elif isinstance(m, MoELoRALinear):
                tensors[f"moelora.layers.{L}.self_attn.{proj}.moe_gate.weight"] = m.router.detach().contiguous()
                for e in range(E):
                    put(f"moelora.layers.{L}.self_attn.{proj}.experts.{e}", m.A[e], m.B[e])
        if isinstance(layer.mlp, MixLoRAFFN):
            ffn = layer.mlp
            tensors[f"mixlora.layers.{L}.mlp.moe_gate.weight"] = ffn.router.detach().contiguous()
            for proj, A, B in (
                ("gate_proj", ffn.gate_A, ffn.gate_B),
                ("up_proj", ffn.up_A, ffn.up_B),
                ("down_proj", ffn.down_A, ffn.down_B),
            ):
                for e in range(E):
                    put(f"mixlora.layers.{L}.mlp.{proj}.experts.{e}", A[e], B[e])
        else:
            for proj in FFN:
                m = getattr(layer.mlp, proj)
                if isinstance(m, MoELoRALinear):
                    tensors[f"moelora.layers.{L}.mlp.{proj}.moe_gate.weight"] = m.router.detach().contiguous()
                    for e in range(E):
                        put(f"moelora.layers.{L}.mlp.{proj}.experts.{e}", m.A[e], m.B[e])
    save_file(tensors, Path(folder) / "adapter_model.safetensors")
    config = {
        "peft_type": kind.upper(),
        "routing_strategy": kind,
        "num_experts": E,
        "top_k": k,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "base_model_name_or_path": base_model,
        "task_type": "CAUSAL_LM",
        **extra,
    }
    if kind == "mixlora":
        config["act_fn"] = model.config.hidden_act
    (Path(folder) / "adapter_config.json").write_text(json.dumps(config, indent=2))
