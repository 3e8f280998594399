"""The composition root (mole_serve/compose.py): one build wires the store, catalog, retriever, gate
and engine, and the engine serves from the catalog it is handed without owning it."""

from __future__ import annotations

import pytest
import torch
from mole_serve.compose import build, gate_base
from mole_serve.config import Settings
from mole_serve.engine.model import DecoderModel
from mole_serve.engine.request import SamplingParams
from mole_serve.library.artifacts import save_gate
from mole_serve.library.store import GATE_DIR
from mole_serve.lora.gate import GateConfig, MoLEGate
from mole_serve.routing.types import AdapterRef

from tests.unit.helpers import carded_adapters


@pytest.fixture
def store(tmp_path):
    return carded_adapters(tmp_path, seed=60)


def built_over(store, tokenizer, **kw):
    hf, root = store
    model = DecoderModel(hf.config, hf.state_dict(), torch.device("cpu"), torch.float32)
    settings = Settings(adapters_dir=root, max_model_len=64, max_num_seqs=4, max_loras=4)
    return build(settings, retrieval=False, model=model, tokenizer=tokenizer, **kw)


def test_build_registers_the_store_and_hands_the_engine_its_library(store, tokenizer):
    built = built_over(store, tokenizer)
    assert built.catalog.names == ["alpha", "beta"]
    assert built.engine.adapters is built.catalog and built.engine.selector.retriever is built.catalog.retriever is None
    assert built.engine.model_name.lower() in built.catalog.base_names
    seq = built.engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2), [(AdapterRef("beta"),)])[0]
    assert len(seq.output_ids) == 2 and built.engine.pool.is_resident("beta")
    built.remove_adapter("beta")
    assert "beta" not in built.catalog and not built.engine.is_known("beta")
    assert built_over(store, tokenizer, load_store=False).catalog.names == []


def test_the_stored_gate_is_attached_when_it_fits_the_base(store, tokenizer):
    _, root = store
    assert built_over(store, tokenizer).engine.pool.gate is None  # no gate/ folder
    model = built_over(store, tokenizer, load_store=False).engine.model
    save_gate(MoLEGate(GateConfig.for_base(gate_base(model), model.lora_spec())), root / GATE_DIR)
    assert built_over(store, tokenizer).engine.pool.gate is not None
    assert built_over(store, tokenizer, with_gate=False).engine.pool.gate is None
    save_gate(MoLEGate(GateConfig("another-base", 2, 64, 128)), root / GATE_DIR)
    refused = built_over(store, tokenizer)  # served without it (tests/unit/test_base_families_api.py)
    assert refused.engine.pool.gate is None and "another-base" in (refused.catalog.gate_refused or "")
