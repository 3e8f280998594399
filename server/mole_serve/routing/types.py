"""How a request asks for adapters: the vocabulary shared by the API, routing and the engine.
Pure Python (the HTTP layer imports it); each choice is defined once here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from mole_serve.errors import InvalidRequest

Composition = Literal["gate", "mixture", "select", "merge"]
MergeStrategy = Literal["linear", "cat", "ties", "dare_linear", "dare_ties"]
COMPOSITIONS: tuple[str, ...] = get_args(Composition)
MERGE_STRATEGIES: tuple[str, ...] = get_args(MergeStrategy)
DENSITY_STRATEGIES = ("ties", "dare_linear", "dare_ties")  # the strategies that prune to a density


@dataclass(frozen=True)
class AdapterRef:
    """One member of a request's adapter set: an adapter by name and its prior weight."""

    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class MergeSpec:
    strategy: MergeStrategy = "linear"
    density: float = 1.0  # kept fraction for ties / dare
    seed: int = 0  # dare's random drop


@dataclass(frozen=True)
class Selection:
    """How a request's adapters are chosen; the engine resolves it when the request enters (retrieval
    embeds a step's new requests together). Candidates are `explicit` when given (MoLE's branch
    masking: the gate renormalizes over them), else the top_k retrieved for `query`, or `retrieved`
    when retrieval already ran upstream (a Ray ingress routes by its top hit: the engine does not
    embed the query again)."""

    composition: Composition
    explicit: tuple[AdapterRef, ...] = ()
    query: str | None = None
    top_k: int = 3
    merge: MergeSpec = MergeSpec()
    retrieved: tuple[tuple[str, float], ...] | None = None  # (adapter, score), best first, over the floor
    # the prompt in each input form an adapter the request may run reads (input_forms.py): the
    # engine sends the chosen set's form instead of the plain prompt
    prompts_by_form: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.composition not in COMPOSITIONS:
            raise InvalidRequest(f"composition must be one of {', '.join(COMPOSITIONS)}", "composition")
        if self.merge.strategy not in MERGE_STRATEGIES:
            raise InvalidRequest(f"merge strategy must be one of {', '.join(MERGE_STRATEGIES)}", "merge.strategy")
        if not 0 < self.merge.density <= 1:
            raise InvalidRequest("merge density must be in (0, 1]", "merge.density")


@dataclass
class Chosen:
    """A request's adapters once its selection is resolved."""

    adapters: tuple[AdapterRef, ...] = ()
    gated: bool = False  # the gate weighs `adapters` per layer and token; their weights are a mask
    scores: dict[str, float] = field(default_factory=dict)  # retrieval score per chosen adapter
    sources: tuple[str, ...] = ()  # the adapters a merge was built from


def report(
    chosen: Chosen, gate_sums: Sequence[float], gate_count: int, expert_usage: Sequence[float] = ()
) -> list[dict]:
    """What the response tells about the adapters: names, weights, retrieval scores, gate means,
    a MoE adapter's expert usage. gate_sums: the gate's weight per adapter summed over layers and
    tokens, then its base column's share and the entropy (lora/gate.py GateStats); expert_usage: a
    MoE adapter's routing weight per expert, summed."""
    entries = []
    for i, a in enumerate(chosen.adapters):
        entry: dict = {"name": a.name, "weight": round(a.weight, 4)}
        if a.name in chosen.scores:
            entry["score"] = round(chosen.scores[a.name], 4)
        if chosen.gated and gate_count:
            entry["gate_weight"] = round(gate_sums[i] / gate_count, 4)
        entries.append(entry)
    if chosen.gated and gate_count and gate_sums[-2] > 0:  # a fusion gate: the share that went to no adapter
        entries[0]["base_gate_weight"] = round(gate_sums[-2] / gate_count, 4)
    if expert_usage and sum(expert_usage) > 0:  # a mixture of LoRA experts, named alone
        entries[0]["expert_usage"] = [round(u / sum(expert_usage), 4) for u in expert_usage]
    if chosen.sources:  # a merge: one virtual adapter built from these
        entries[0]["sources"] = [
            {"name": n, **({"score": round(chosen.scores[n], 4)} if n in chosen.scores else {})} for n in chosen.sources
        ]
    return entries


def gate_entropy(chosen: Chosen, gate_sums: Sequence[float], gate_count: int) -> float | None:
    """Mean entropy of the gate's weights over the request's layers and tokens."""
    return gate_sums[-1] / gate_count if chosen.gated and gate_count else None
