"""train-gate on a tiny random Llama with three random adapters carrying real task cards: the
router's parameters move, the losses are finite, and the saved gate loads back into an engine."""

import json

import torch

from server.lora.gate import GATE_DIR, MoLEGate
from server.lora.retriever import Embedder, Retriever
from server.training.tasks import TASKS
from server.training.train_gate import GateTrainOptions, UsageTracker, save_gate, train_gate
from tests.unit.helpers import engine_for, make_adapter, tiny_hf_model

LIBRARY = ("int_to_roman", "roman_to_int", "odd_or_even")


def test_train_gate_learns_saves_and_loads(tmp_path, tokenizer):
    hf = tiny_hf_model()
    for i, task in enumerate(LIBRARY):
        path = make_adapter(hf, tmp_path / task, seed=300 + i)
        examples = [p for p, _ in TASKS[task].examples("train", 8, seed=1)]
        (path / "card.json").write_text(json.dumps({"name": task, "task": task, "examples": examples}))
    engine = engine_for(hf, tokenizer, adapters_dir=tmp_path, max_model_len=256)
    engine.retriever = Retriever(Embedder())
    for task in LIBRARY:
        engine.add_adapter(task, tmp_path / task)
    opts = GateTrainOptions(steps=3, batch=2, top_k=3, lr=0.05, prior_temperature_max=1.0, route_weight=1.0)
    gate, log = train_gate(engine, engine.retriever, opts)
    assert log["summary"]["library"] == sorted(LIBRARY) and len(log["steps"]) == 3
    assert all(torch.isfinite(torch.tensor([s["lm"], s["balance"], s["route"]])).all() for s in log["steps"])
    torch.manual_seed(opts.seed)
    untrained = MoLEGate(gate.config)  # train_gate's init: drawn first under the same seed
    assert not torch.allclose(gate.query, untrained.query) and not torch.allclose(gate.key, untrained.key)
    save_gate(gate, log, tmp_path / GATE_DIR)
    engine.load_gate(tmp_path / GATE_DIR)
    assert torch.equal(engine.pool.gate.log_gain, gate.log_gain)
    assert json.loads((tmp_path / GATE_DIR / "training_log.json").read_text())["summary"]["wall_time_s"] >= 0


def test_balance_loss_is_zero_when_usage_is_even_and_grows_with_skew():
    even = UsageTracker().balance({"a": [torch.tensor(0.5)], "b": [torch.tensor(0.5)]})
    skewed = UsageTracker().balance({"a": [torch.tensor(0.9)], "b": [torch.tensor(0.1)]})
    assert abs(even.item()) < 1e-6 and skewed.item() > 0.3


def test_balance_counts_every_example_so_a_sharp_router_is_balanced_when_tasks_are():
    # b is a distractor twice and true once; a router that always picks the true adapter gives
    # each adapter one example's weight, which is balanced (a per-candidacy mean would not be).
    t = torch.tensor
    sharp = {"a": [t(1.0), t(0.0)], "b": [t(0.0), t(1.0), t(0.0)], "c": [t(1.0)]}
    assert abs(UsageTracker().balance(sharp).item()) < 1e-6
    collapsed = {"a": [t(0.0), t(0.0)], "b": [t(1.0), t(1.0), t(1.0)], "c": [t(0.0)]}
    assert UsageTracker().balance(collapsed).item() > 1.0
