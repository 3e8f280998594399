"""Tiny random-weight models and PEFT adapters for the unit tests."""

from __future__ import annotations

import json
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from mole_serve.compose import Components, build
from mole_serve.config import Settings
from mole_serve.engine.engine import LLMEngine
from mole_serve.engine.model import DecoderModel
from mole_serve.lora.kinds.base import AdapterWeights
from mole_serve.routing.retriever import Retriever
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# the unit tests' model size, for any family's config class
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_hf_model(kind: str = "llama", vocab_size: int = 49152, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, tie_word_embeddings=True, **TINY_SHAPE)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


_STEP_LOGITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> its last step's logits


def watch_logits(engine: LLMEngine) -> LLMEngine:
    """Keep each step's logits [N, V] on the test side (the runner keeps nothing): last_logits reads them."""
    forward = engine.runner.forward_logits

    def recorded(batch):
        _STEP_LOGITS[engine] = logits = forward(batch)
        return logits

    engine.runner.forward_logits = recorded
    return engine


def last_logits(engine: LLMEngine) -> torch.Tensor:
    """The logits [N, V] of the engine's last step with a forward (the engine was watched)."""
    return _STEP_LOGITS[engine]


def engine_for(
    hf_model, tokenizer, dtype: torch.dtype = torch.float32, retriever: Retriever | None = None, **settings
) -> LLMEngine:
    """An engine on `hf_model` through the composition root, with an empty library of its own
    (add_adapter registers folders) and, given a retriever, model `auto`."""
    defaults = dict(max_num_seqs=8, max_model_len=128, max_prefill_tokens=32, max_loras=8)
    settings = Settings(**{**defaults, **settings})
    model = DecoderModel(hf_model.config, hf_model.state_dict(), torch.device(settings.device), dtype)
    built = build(
        settings,
        retrieval=retriever is not None,
        load_store=False,
        model=model,
        tokenizer=tokenizer,
        retriever=retriever,
    )
    return watch_logits(built.engine)


def served(engine: LLMEngine) -> Components:
    """The engine and the library it serves from, as create_app's loader returns them."""
    return Components(engine.settings, engine.adapters, engine)


def add_adapter(engine: LLMEngine, name: str, folder: Path) -> AdapterWeights:
    """Register a folder in the engine's library and serve it (what an upload does)."""
    return served(engine).add_adapter(name, folder)


def remove_adapter(engine: LLMEngine, name: str) -> None:
    served(engine).remove_adapter(name)


def make_adapter(
    hf_model, out_dir: Path, seed: int, rank: int = 4, targets=ALL_TARGETS, alpha: int = 8, use_rslora: bool = False
) -> Path:
    """A PEFT LoRA with random A and B (init_lora_weights=False), saved as a PEFT folder."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, use_rslora=use_rslora
    )
    peft_model = get_peft_model(hf_model, config)
    peft_model.save_pretrained(out_dir)
    peft_model.unload()  # restore the plain modules of hf_model
    return out_dir


def carded_adapters(root: Path, seed: int, names: tuple[str, ...] = ("alpha", "beta")):
    """A tiny model and a random adapter per name in root, each with a card of five examples."""
    hf = tiny_hf_model()
    for i, name in enumerate(names):
        make_adapter(hf, root / name, seed=seed + i)
        (root / name / "card.json").write_text(json.dumps({"name": name, "examples": [f"{name} task"] * 5}))
    return hf, root


def task_library_engine(tmp_path: Path, tokenizer, tasks: tuple[str, ...], **settings) -> LLMEngine:
    """An engine on a tiny model with one random adapter per task, each with a real task card, and
    a retriever (the real embedder) over the cards."""
    from mole_serve.routing.retriever import Embedder, Retriever
    from mole_serve.training.tasks import TASKS

    hf = tiny_hf_model()
    for i, task in enumerate(tasks):
        path = make_adapter(hf, tmp_path / task, seed=300 + i)
        examples = [p for p, _ in TASKS[task].examples("train", 8, seed=1)]
        (path / "card.json").write_text(json.dumps({"name": task, "task": task, "examples": examples}))
    engine = engine_for(hf, tokenizer, retriever=Retriever(Embedder()), adapters_dir=tmp_path, **settings)
    for task in tasks:
        add_adapter(engine, task, tmp_path / task)
    return engine


@contextmanager
def live_server(app) -> Iterator[str]:
    """`app` served as `mole-serve serve` serves it (its settings' timeouts and connection cap), on a
    free loopback port in a thread; yields its URL once it listens and its engine is attached."""
    import uvicorn
    from mole_serve.api.http_server import uvicorn_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, app.state.settings, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.perf_counter() + 60
        while not server.started or app.state.engine is None:
            assert time.perf_counter() < deadline, "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
