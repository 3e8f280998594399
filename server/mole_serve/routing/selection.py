"""Turns a request's Selection into its adapter set: retrieval for `auto` (one batched embedding
per step), then the composition mode: gate, mixture, select, or a static merge held in one slot.
Runs without an engine: a selection in, a `Chosen` out."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Protocol

import torch

from mole_serve.config import Settings
from mole_serve.errors import AdapterNotFound, InvalidRequest
from mole_serve.lora.kinds.base import AdapterWeights
from mole_serve.routing.merge import merge_adapters, merge_key
from mole_serve.routing.retriever import Retriever
from mole_serve.routing.types import AdapterRef, Chosen, Selection


class SelectionError(InvalidRequest):
    """A selection that cannot be built (a merge of incompatible adapters, over the rank limit)."""


class Merges(Protocol):
    """Where merged adapters are kept (the pool's virtual adapters) and the sources' weights read."""

    dtype: torch.dtype  # what the merged factors run in

    def weights(self, name: str) -> AdapterWeights: ...

    def has_virtual(self, name: str) -> bool: ...

    def put_virtual(self, weights: AdapterWeights, max_kept: int) -> None: ...


def softmax(scores: Seq[float], temperature: float) -> list[float]:
    top = max(scores)
    exps = [math.exp((s - top) / temperature) for s in scores]
    return [e / sum(exps) for e in exps]


class AdapterSelector:
    """exists: whether an adapter name exists now (the catalog); merges: where merges are built."""

    def __init__(
        self, settings: Settings, exists: Callable[[str], bool], merges: Merges, retriever: Retriever | None = None
    ) -> None:
        self.settings, self.exists, self.merges = settings, exists, merges
        self.retriever = retriever  # None: `auto` is the base model
        self.retrieval_seconds: list[float] = []  # one entry per batched search, drained by metrics

    def retrieve(self, selections: Seq[Selection]) -> list[list[tuple[str, float]]]:
        """Per selection, its top-k (adapter, score) over the similarity floor; one batch for all."""
        hits: list[list[tuple[str, float]]] = [
            list(s.retrieved[: s.top_k]) if s.retrieved is not None else [] for s in selections
        ]
        asking = {  # selection index -> its query
            i: s.query
            for i, s in enumerate(selections)
            if s.query is not None and not s.explicit and s.retrieved is None
        }
        if not asking or self.retriever is None:
            return hits
        start = time.perf_counter()
        k = max(selections[i].top_k for i in asking)
        found = self.retriever.search(list(asking.values()), k, self.settings.retrieval_floor)
        self.retrieval_seconds.append(time.perf_counter() - start)
        for i, h in zip(asking, found):
            hits[i] = h[: selections[i].top_k]
        return hits

    def choose(self, sel: Selection, hits: list[tuple[str, float]]) -> Chosen:
        """The adapters of a selection given its retrieval hits. Raises AdapterNotFound, SelectionError."""
        chosen = Chosen()
        if sel.explicit:
            names, priors = [a.name for a in sel.explicit], [a.weight for a in sel.explicit]
        else:
            names, scores = [n for n, _ in hits], [s for _, s in hits]
            chosen.scores = dict(hits)
            priors = softmax(scores, self.settings.mixture_temperature) if scores else []
        for name in names:
            if not self.exists(name):  # deleted since the request was accepted
                raise AdapterNotFound(f"The adapter `{name}` does not exist.", "adapters")
        if not names:  # nothing relevant retrieved: the base model answers
            return chosen
        mixtures = self.mixtures(names)
        alone = self.runs_alone(names, sel, mixtures)
        if alone is not None:
            chosen.adapters = (AdapterRef(alone, 1.0),)
            chosen.scores = {alone: chosen.scores[alone]} if alone in chosen.scores else {}
            return chosen
        if mixtures:  # retrieved mixtures of experts below the top hit: the rest go without them
            kept = [i for i, n in enumerate(names) if n not in mixtures]
            names, priors = [names[i] for i in kept], [priors[i] for i in kept]
        total = sum(priors)
        priors = [w / total for w in priors]
        if sel.composition == "select":
            best = max(range(len(names)), key=priors.__getitem__)
            chosen.adapters = (AdapterRef(names[best], 1.0),)
        elif sel.composition == "merge":
            chosen.adapters = (AdapterRef(self._merged(names, priors, sel), 1.0),)
            chosen.sources = tuple(names)
        else:  # mixture, or gate: the gate computes per-layer, per-token weights from these priors
            chosen.adapters = tuple(AdapterRef(n, w) for n, w in zip(names, priors))
            chosen.gated = sel.composition == "gate" and len(names) > 1
        return chosen

    def mixtures(self, names: list[str]) -> list[str]:
        """Those of `names` that are mixtures of LoRA experts, in order."""
        return [n for n in names if self.merges.weights(n).moe is not None]

    def runs_alone(self, names: list[str], sel: Selection, mixtures: list[str] | None = None) -> str | None:
        """The adapter when the selection is one mixture of LoRA experts (its routers mix its own
        experts, so it runs by itself): named alone, or retrieval's top hit. SelectionError when
        one is named with others or for a merge, or needs more slots than the pool has.
        mixtures: self.mixtures(names), when the caller has it."""
        mixtures = self.mixtures(names) if mixtures is None else mixtures
        if not mixtures or (not sel.explicit and mixtures[0] != names[0]):
            return None
        weights = self.merges.weights(mixtures[0])
        moe = weights.moe
        assert moe is not None  # mixtures() keeps the MoE-kind adapters only
        if sel.explicit and (len(names) > 1 or sel.composition == "merge"):
            what = "with other adapters" if len(names) > 1 else "in a merge"
            raise SelectionError(
                f"adapter `{weights.name}` is a {weights.kind} adapter: its own routers mix its "
                f"{moe.num_experts} experts, so a request names it alone, not {what}",
                "adapters",
            )
        slots = 1 + moe.num_experts
        if slots > self.settings.max_loras:
            raise SelectionError(
                f"adapter `{weights.name}` needs {slots} adapter slots (one per expert and one "
                f"shared); this server has max_loras={self.settings.max_loras}",
                "adapters",
            )
        return weights.name

    def _merged(self, names: list[str], weights: list[float], sel: Selection) -> str:
        spec = sel.merge
        name = "merge-" + merge_key(names, weights, spec.strategy, spec.density, spec.seed)
        if not self.merges.has_virtual(name):
            sources = [self.merges.weights(n) for n in names]
            try:
                merged = merge_adapters(
                    sources, weights, spec.strategy, name, spec.density, spec.seed, self.merges.dtype
                )
            except ValueError as e:
                raise SelectionError(f"merge: {e}", "merge") from e
            if merged.rank > self.settings.max_lora_rank:
                raise SelectionError(
                    f"merge: the {spec.strategy} merge has rank {merged.rank}, over the limit "
                    f"{self.settings.max_lora_rank}",
                    "merge",
                )
            self.merges.put_virtual(merged, self.settings.max_merges)
        return name
