"""Turns a request's Selection into its adapter set: retrieval for `auto` (one batched embedding
per step), then the composition mode: gate, mixture, select, or a static merge held in one slot."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence as Seq

from server.config import Settings
from server.engine.request import AdapterRef, Selection, Sequence
from server.lora.merge import merge_adapters, merge_key
from server.lora.pool import LoRAPool


class SelectionError(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def softmax(scores: Seq[float], temperature: float) -> list[float]:
    top = max(scores)
    exps = [math.exp((s - top) / temperature) for s in scores]
    return [e / sum(exps) for e in exps]


class AdapterSelector:
    def __init__(self, pool: LoRAPool, settings: Settings) -> None:
        self.pool, self.settings = pool, settings
        self.retriever = None  # server.lora.retriever.Retriever, when `auto` is enabled
        self.retrieval_seconds: list[float] = []  # one entry per batched search, drained by metrics

    def retrieve(self, seqs: list[Sequence]) -> dict[str, list[tuple[str, float]]]:
        """request id -> its top-k (adapter, score) over the similarity floor, one batch for all."""
        asking = [s for s in seqs if s.selection.query is not None and not s.selection.explicit]
        if not asking or self.retriever is None:  # no retriever: `auto` is the base model
            return {}
        start = time.perf_counter()
        k = max(s.selection.top_k for s in asking)
        hits = self.retriever.search([s.selection.query for s in asking], k, self.settings.retrieval_floor)
        self.retrieval_seconds.append(time.perf_counter() - start)
        return {s.request_id: h[: s.selection.top_k] for s, h in zip(asking, hits)}

    def apply(self, seq: Sequence, hits: list[tuple[str, float]]) -> None:
        """Set seq.adapters (and gated, scores, sources) from its selection. Raises SelectionError."""
        sel = seq.selection
        if sel.explicit:
            names, priors = [a.name for a in sel.explicit], [a.weight for a in sel.explicit]
        else:
            names, scores = [n for n, _ in hits], [s for _, s in hits]
            seq.scores = dict(hits)
            priors = softmax(scores, self.settings.mixture_temperature) if scores else []
        for name in names:
            if name not in self.pool:  # deleted since the request was accepted
                raise SelectionError(f"The adapter `{name}` does not exist.", 404)
        if not names:  # nothing relevant retrieved: the base model answers
            return
        total = sum(priors)
        priors = [w / total for w in priors]
        if sel.composition == "select":
            best = max(range(len(names)), key=priors.__getitem__)
            seq.adapters = (AdapterRef(names[best], 1.0),)
        elif sel.composition == "merge":
            seq.adapters = (AdapterRef(self._merged(names, priors, sel), 1.0),)
            seq.sources = tuple(names)
        else:  # mixture, or gate: the gate computes per-layer, per-token weights from these priors
            seq.adapters = tuple(AdapterRef(n, w) for n, w in zip(names, priors))
            seq.gated = sel.composition == "gate" and len(names) > 1

    def _merged(self, names: list[str], weights: list[float], sel: Selection) -> str:
        spec = sel.merge
        name = "merge-" + merge_key(names, weights, spec.strategy, spec.density, spec.seed)
        if name not in self.pool:
            sources = [self.pool.weights(n) for n in names]
            try:
                merged = merge_adapters(sources, weights, spec.strategy, name, spec.density, spec.seed)
            except ValueError as e:
                raise SelectionError(f"merge: {e}") from e
            if merged.rank > self.settings.max_lora_rank:
                raise SelectionError(f"merge: the {spec.strategy} merge has rank {merged.rank}, over the limit "
                                     f"{self.settings.max_lora_rank}")
            self.pool.register_weights(merged, self.settings.max_merges)
        return name

    @staticmethod
    def report(seq: Sequence) -> list[dict]:
        """What the response tells about the adapters: names, weights, retrieval scores, gate means."""
        entries = []
        for i, a in enumerate(seq.adapters):
            entry: dict = {"name": a.name, "weight": round(a.weight, 4)}
            if a.name in seq.scores:
                entry["score"] = round(seq.scores[a.name], 4)
            if seq.gated and seq.gate_count:
                entry["gate_weight"] = round(seq.gate_sums[i] / seq.gate_count, 4)
            entries.append(entry)
        if seq.sources:  # a merge: one virtual adapter built from these
            entries[0]["sources"] = [{"name": n, **({"score": round(seq.scores[n], 4)} if n in seq.scores else {})}
                                     for n in seq.sources]
        return entries

    @staticmethod
    def gate_entropy(seq: Sequence) -> float | None:
        """Mean entropy of the gate's weights over the request's layers and tokens."""
        return seq.gate_sums[-1] / seq.gate_count if seq.gated and seq.gate_count else None
