"""The composition root: the one place that builds the adapter library (store, catalog, retriever),
the gate and the engine from Settings and wires them together. `mole-serve serve`, the Ray ingress
and each Ray replica, training, evaluation, the benchmarks and the tests all build through here;
the parts themselves never construct each other (the engine is handed its adapter source)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mole_serve.config import Settings
from mole_serve.engine.engine import LLMEngine
from mole_serve.engine.loader import resolve_base_model
from mole_serve.engine.model import DecoderModel
from mole_serve.library.artifacts import GateBaseMismatch, load_gate
from mole_serve.library.catalog import Catalog
from mole_serve.library.store import GATE_DIR, PROJECTION_DIR, AdapterStore, adapter_dirs, read_card
from mole_serve.lora.gate import GateConfig
from mole_serve.lora.kinds.base import AdapterWeights, LoRATargetSpec
from mole_serve.routing.retriever import PROJECTION_WEIGHTS, Embedder, RetrievalProjection, Retriever, TextEncoder

log = logging.getLogger(__name__)


def build_embedder(settings: Settings) -> Embedder:
    """The sentence encoder, followed by the store's trained projection when there is one and
    settings.retrieval_projection allows it."""
    embedder = Embedder(settings.embedder, settings.embedder_device)
    folder = Path(settings.adapters_dir) / PROJECTION_DIR
    if settings.retrieval_projection and (folder / PROJECTION_WEIGHTS).is_file():
        embedder.projection = RetrievalProjection.load(folder, embedder)
    return embedder


def store_retriever(
    settings: Settings, cards: dict[str, list[str]] | None = None, embedder: TextEncoder | None = None
) -> Retriever:
    """A retriever over `cards` (name -> example prompts) without a catalog (benchmarks, tests), by
    default every card in adapters_dir that does not opt out of retrieval (`auto: false`)."""
    retriever = Retriever(embedder or build_embedder(settings), exact_max=settings.retrieval_exact_max)
    if cards is None:
        found = {name: read_card(path) for name, path in adapter_dirs(settings.adapters_dir).items()}
        cards = {name: card.get("examples") or [] for name, card in found.items() if card.get("auto", True)}
    retriever.set_cards({name: ex for name, ex in cards.items() if ex})
    return retriever


def build_library(
    settings: Settings,
    spec: LoRATargetSpec,
    base_names: set[str],
    *,
    retrieval: bool = True,
    retriever: Retriever | None = None,
) -> Catalog:
    """The store and its catalog (with a retriever over the cards when `retrieval`: `retriever`, or
    one on settings' embedder), empty: the caller registers the stored adapters (`add_store`)."""
    if not retrieval:
        retriever = None
    elif retriever is None:
        retriever = Retriever(build_embedder(settings), exact_max=settings.retrieval_exact_max)
    store = AdapterStore(settings.adapters_dir)
    return Catalog(
        store, spec, settings.max_lora_rank, settings.max_loras, base_names, settings.min_card_examples, retriever
    )


def base_model_names(model: DecoderModel, served_name: str) -> set[str]:
    """Lower-case ids an adapter's base_model_name_or_path may give: the folder's name, the served one."""
    return {n.lower() for n in (Path(model.config.name_or_path or "").name, served_name) if n}


def gate_base(model: DecoderModel) -> str:
    """The base model name a gate records (and is checked against)."""
    return Path(model.config.name_or_path or "base").name


@dataclass
class Components:
    """A built server: the library and the engine serving from it, in this process."""

    settings: Settings
    catalog: Catalog
    engine: LLMEngine

    def add_adapter(self, name: str, folder: Path) -> AdapterWeights:
        """Register an adapter folder (or a new version of it) and serve it (tests, benchmarks,
        evaluation; the admin API goes through Catalog.upload)."""
        weights = self.catalog.add(name, Path(folder))
        self.engine.add_adapter(name, weights)
        return weights

    def remove_adapter(self, name: str) -> None:
        self.catalog.remove(name)
        self.engine.remove_adapter(name)

    def load_gate(self, folder: Path) -> None:
        """Serve with the trained router in `folder` (refused if trained for another base model)."""
        model = self.engine.model
        self.engine.attach_gate(load_gate(folder, GateConfig.for_base(gate_base(model), model.lora_spec())))


def build(
    settings: Settings,
    *,
    retrieval: bool = True,
    load_store: bool = True,
    with_gate: bool = True,
    model: DecoderModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    retriever: Retriever | None = None,
) -> Components:
    """Base model, library and engine from settings. retrieval: embed the cards for `auto` (a Ray
    replica has none: its ingress retrieves); load_store: register every adapter of adapters_dir
    (off: an empty library, for callers that add adapters themselves); with_gate: attach the trained
    gate of the store's gate/ folder if there is one (one trained for another base model is left
    out, logged and named on /v1/models: `auto` then mixes what it retrieves). model, tokenizer,
    retriever: already built ones (tests). The store is not recovered here: that is for the one
    process that starts a deployment (store.recover)."""
    if model is None or tokenizer is None:
        path = resolve_base_model(settings)
        if model is None:
            dtype = getattr(torch, settings.torch_dtype_name())
            model = DecoderModel.from_pretrained(path, torch.device(settings.device), dtype)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    catalog = build_library(settings, model.lora_spec(), set(), retrieval=retrieval, retriever=retriever)
    engine = LLMEngine(model, tokenizer, settings, catalog, catalog.retriever)
    catalog.base_names = base_model_names(model, engine.model_name)
    built = Components(settings, catalog, engine)
    if load_store:
        for weights in catalog.add_store():
            engine.add_adapter(weights.name, weights)
        gate_dir = Path(settings.adapters_dir) / GATE_DIR
        if with_gate and gate_dir.is_dir():
            try:
                built.load_gate(gate_dir)
            except GateBaseMismatch as e:
                catalog.gate_refused = str(e)
                log.warning("%s: not served; `auto` composes the adapters it retrieves with `mixture`", e)
    return built
