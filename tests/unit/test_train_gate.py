"""train-gate on a tiny random Llama with three random adapters carrying real task cards: the
router's parameters move, the losses are finite, and the saved gate loads back into an engine."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from mole_serve.library.store import GATE_DIR
from mole_serve.lora.gate import GateConfig, MoLEGate
from mole_serve.training.tasks import COMPOSITES, TASKS
from mole_serve.training.train_adapter import encode
from mole_serve.training.train_gate import (
    BASE_COLUMN,
    Example,
    GateTrainOptions,
    UsageTracker,
    answer_rows,
    candidate_sets,
    composite_pairs,
    main,
    make_examples,
    part_adapters,
    save_gate,
    step_losses,
    train_gate,
    training_pairs,
)

from tests.unit.helpers import add_adapter, served, task_library_engine

LIBRARY = ("int_to_roman", "add_3digit", "odd_or_even")  # two composite tasks need two of them


@pytest.fixture
def library_engine(tmp_path, tokenizer):
    return task_library_engine(tmp_path, tokenizer, LIBRARY, max_model_len=256)


def test_train_gate_learns_saves_and_loads(tmp_path, library_engine):
    engine = library_engine
    opts = GateTrainOptions(steps=3, batch=2, top_k=3, lr=0.05, prior_temperature_max=1.0, route_weight=1.0)
    gate, log = train_gate(engine, engine.selector.retriever, opts)
    assert log["summary"]["library"] == sorted(LIBRARY) and len(log["steps"]) == 3
    # few-shot: fine-tuned from that gate on the composite task whose skills the library holds
    tuned, log = train_gate(
        engine,
        engine.selector.retriever,
        GateTrainOptions(steps=2, batch=2, composite_per_task=2, lr=0.05),
        init=MoLEGate(gate.config).requires_grad_(False),
    )
    assert len(log["steps"]) == 2 and all(math.isfinite(s["route"]) for s in log["steps"])
    assert all(torch.isfinite(torch.tensor([s["lm"], s["balance"], s["route"]])).all() for s in log["steps"])
    torch.manual_seed(opts.seed)
    untrained = MoLEGate(gate.config)  # train_gate's init: drawn first under the same seed
    assert not torch.allclose(gate.query, untrained.query) and not torch.allclose(gate.key, untrained.key)
    save_gate(gate, log, tmp_path / GATE_DIR)
    served(engine).load_gate(tmp_path / GATE_DIR)
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


def test_routing_loss_reads_the_true_adapters_weight_on_the_answer_tokens(library_engine):
    # A silent router (gain 0) with prior scale 1 gives every token the prior itself, so the
    # routing loss is the mean of -log(prior of the true adapter), wherever it sits in the set.
    engine = library_engine
    gate = MoLEGate(GateConfig.for_base("tiny", engine.model.lora_spec()))
    with torch.no_grad():
        gate.log_gain.fill_(-math.inf)
    tok = engine.tokenizer
    priors = [[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.3, 0.2, 0.5]]  # over each example's candidates in order
    # the same true adapter at a different place in each candidate order: first, last, middle
    examples = [
        Example(encode(tok, p, a), len(encode(tok, p)), [*LIBRARY[i:], *LIBRARY[:i]], priors[i], (LIBRARY[0],))
        for i, (p, a) in enumerate(TASKS["odd_or_even"].examples("train", 3))
    ]
    _, _, route, top1 = step_losses(engine, gate, examples, UsageTracker())
    assert route.item() == pytest.approx(-np.log([0.7, 0.4, 0.2]).mean(), rel=1e-4)
    assert top1 == pytest.approx(1 / 3)  # the true adapter has the largest prior only in the first
    # a composite answer needs two: the loss reads their summed weight, a hit is either on top
    for ex in examples:
        ex.true = (LIBRARY[0], LIBRARY[1])
    _, _, route, top1 = step_losses(engine, gate, examples, UsageTracker())
    assert route.item() == pytest.approx(-np.log([0.7 + 0.2, 0.4 + 0.5, 0.2 + 0.5]).mean(), rel=1e-4)
    assert top1 == 1.0
    # part routing: each answer token reads the weight of its own adapters
    for ex in examples:
        n = len(ex.ids) - ex.num_prompt
        ex.token_true = [(LIBRARY[0],)] * (n - 1) + [(LIBRARY[1],)]
    _, _, route, _ = step_losses(engine, gate, examples, UsageTracker())
    per_example = [
        (-(n - 1) * np.log(p[0]) - np.log(p[1])) / n
        for ex, p in zip(examples, [[0.7, 0.2], [0.4, 0.5], [0.2, 0.5]])
        for n in [len(ex.ids) - ex.num_prompt]
    ]
    assert route.item() == pytest.approx(np.mean(per_example), rel=1e-4)


def test_part_routing_gives_each_part_of_a_sequential_answer_its_own_skill(tokenizer):
    true = ("words", "roman")
    answer = "forty-seven, XLVII"
    parts = part_adapters(tokenizer, answer, len("forty-seven"), true)
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    assert len(parts) == len(ids) + 1 and parts[-1] == ("roman",)  # the end token: the second part's
    text = [tokenizer.decode(ids[j : j + 1]) for j in range(len(ids))]
    assert "".join(t for t, p in zip(text, parts) if p == ("words",)) == "forty-seven"
    assert "".join(t for t, p in zip(text, parts) if p == ("roman",)).strip() == "XLVII"
    assert all(p == true for t, p in zip(text, parts) if "," in t)  # the separator: either
    with_base = part_adapters(tokenizer, answer, len("forty-seven"), true, base=True)  # a fusion gate's
    assert [p for p in with_base if p != (BASE_COLUMN,)] == [p for p in parts if p != true]
    assert all(p == (BASE_COLUMN,) for t, p in zip(text, with_base) if "," in t)  # the base column carries it
    library = {t: t for t in TASKS}
    pairs = composite_pairs(library, 2, seed=0, part_routing=True)
    for _, a, _, first in pairs:  # only the sequential composites are split, at their last ", "
        assert first is None or a[first:].startswith(", ") and ", " not in a[first + 2 :]
    sequential = sum(c.shape == "sequential" for c in COMPOSITES.values())
    assert 0 < sequential < len(COMPOSITES) and sum(first is not None for *_, first in pairs) == 2 * sequential


def test_boundary_weight_weighs_the_separator_tokens_lm_loss_only(tokenizer):
    answer, true = "forty-seven, XLVII", ("words", "roman")
    prompt = encode(tokenizer, "in words, then roman: 47")
    parts = part_adapters(tokenizer, answer, len("forty-seven"), true, base=True)
    split = Example(
        encode(tokenizer, "in words, then roman: 47", answer), len(prompt), list(true), [0.5, 0.5], true, parts
    )
    single = Example(
        encode(tokenizer, "in roman: 47", "XLVII"), len(encode(tokenizer, "in roman: 47")), ["roman"], [1.0], ("roman",)
    )
    rows, targets, weights = answer_rows([split, single], boundary_weight=5.0)
    assert len(rows) == len(targets) == len(weights) == len(parts) + len(single.ids) - single.num_prompt
    assert [w for w, p in zip(weights, parts) if w != 1.0] == [5.0 for p in parts if p == (BASE_COLUMN,)] != []
    assert weights[len(parts) :] == [1.0] * (len(single.ids) - single.num_prompt)  # no parts: no boundary
    assert set(answer_rows([split], 1.0)[2]) == {1.0}


@pytest.mark.parametrize(
    ("argv", "needed"),
    [(["--bias-by-base"], "--fusion"), (["--composite-per-task", "10", "--boundary-weight", "5"], "--part-routing")],
)
def test_options_that_need_another_are_refused_without_it(argv, needed, capsys):
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2 and f"needs {needed}" in capsys.readouterr().err


def test_few_shot_pairs_force_both_skills_in_and_replay_single_tasks():
    library = {t: t for t in TASKS}
    opts = GateTrainOptions(steps=10, batch=6, composite_per_task=4, replay=0.5, top_k=3, dropout=1.0, random_sets=0.0)
    pairs = training_pairs(library, opts)
    assert len(pairs) == 60
    few = {(p, t) for p, _, t, _ in pairs if len(t) == 2}
    assert len(few) == 4 * len(COMPOSITES) and {t for _, t in few} == {c.skills for c in COMPOSITES.values()}
    assert sum(len(t) == 1 for _, _, t, _ in pairs[:48]) == 24  # replay: as many single-task examples
    names = sorted(library)
    sets = candidate_sets([("a", "b"), ("a",)], names, [["c", "a", "d"], ["a", "b", "c"]], opts, random.Random(0))
    assert sorted(sets[0]) == ["a", "b"]  # every distractor dropped (dropout 1): the two true remain
    assert sorted(sets[1]) == ["a", "b"]  # a single true adapter keeps one distractor


def test_gate_examples_are_encoded_as_served_spelled_for_a_spelled_top_candidate(tmp_path, tokenizer):
    engine = task_library_engine(tmp_path, tokenizer, ("reverse_letters", "add_3digit"), max_model_len=256)
    card = tmp_path / "reverse_letters" / "card.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "input": "spelled"}))
    add_adapter(engine, "reverse_letters", tmp_path / "reverse_letters")  # registered again, card read
    pairs = [
        ("Reverse planet", "tenalp", ("reverse_letters",), None),
        ("Add 100 and 200", "300", ("add_3digit",), None),
    ]
    opts = GateTrainOptions(top_k=1, uniform_priors=0.0)  # one candidate: retrieval's top hit
    examples = make_examples(engine, engine.selector.retriever, pairs, ["reverse_letters", "add_3digit"], opts)
    by_true = {e.true: e for e in examples}
    assert by_true[("reverse_letters",)].candidates == ["reverse_letters"]
    assert by_true[("reverse_letters",)].ids == encode(tokenizer, "Reverse planet", "tenalp", spelled=True)
    assert by_true[("add_3digit",)].ids == encode(tokenizer, "Add 100 and 200", "300")


def test_a_fusion_gates_routing_loss_reads_the_base_column_and_train_gate_adds_it(library_engine, tmp_path):
    """A silent fusion router (gain 0, prior scale 1, base logit 0, no bias) gives each candidate
    half its prior and the base column one half: a token rewarding the base column reads 1/2. Fine-
    tuning a plain gate with fusion keeps its router and learns the new parameters, which load back."""
    engine = library_engine
    gate = MoLEGate(GateConfig.for_base("tiny", engine.model.lora_spec(), fusion=True))
    with torch.no_grad():
        gate.log_gain.fill_(-math.inf)
        gate.base_logit.fill_(0.0)
    tok = engine.tokenizer
    priors = [[0.7, 0.2, 0.1], [0.5, 0.1, 0.4]]
    examples = [
        Example(encode(tok, p, a), len(encode(tok, p)), [*LIBRARY[i:], *LIBRARY[:i]], priors[i], (LIBRARY[0],))
        for i, (p, a) in enumerate(TASKS["odd_or_even"].examples("train", 2))
    ]
    for ex in examples:  # every answer token rewards the true adapter, the end token the base column
        n = len(ex.ids) - ex.num_prompt
        ex.token_true = [(LIBRARY[0],)] * (n - 1) + [(BASE_COLUMN,)]
    _, _, route, _ = step_losses(engine, gate, examples, UsageTracker())
    expected = [
        (-(n - 1) * np.log(p / 2) - np.log(0.5)) / n
        for ex, p in zip(examples, [0.7, 0.4])  # the true adapter's prior: first, then last of its set
        for n in [len(ex.ids) - ex.num_prompt]
    ]
    assert route.item() == pytest.approx(np.mean(expected), rel=1e-4)
    served_base = Path(engine.model.config.name_or_path or "base").name  # what train_gate names
    plain = MoLEGate(GateConfig.for_base(served_base, engine.model.lora_spec())).requires_grad_(False)
    opts = GateTrainOptions(steps=2, batch=2, composite_per_task=2, part_routing=True, fusion=True, lr=0.05)
    tuned, _ = train_gate(engine, engine.selector.retriever, opts, init=plain)
    assert tuned.config.fusion and not torch.equal(tuned.base_logit, torch.full_like(tuned.base_logit, -3.0))
    save_gate(tuned, {"summary": {"library": list(LIBRARY)}}, tmp_path / GATE_DIR)
    served(engine).load_gate(tmp_path / GATE_DIR)
    assert torch.equal(engine.pool.gate.rank_bias, tuned.rank_bias)
