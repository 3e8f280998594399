"""The evaluation harness's bookkeeping: the mixed eval set and the accuracy table."""

import math
import re

import torch
from mole_serve.engine.request import SamplingParams
from mole_serve.lora.gate import GateConfig, MoLEGate
from mole_serve.routing.types import AdapterRef, Selection
from mole_serve.training.evaluate import (
    Answer,
    accuracy_table,
    composite_table,
    engine_answers,
    eval_set,
    handoff_answers,
    handoff_table,
    intermediate_table,
    markdown,
    parts_table,
    request_body,
    selection,
    top_adapter,
)
from mole_serve.training.tasks import COMPOSITES, TASKS, caesar, to_words
from mole_serve.training.train_adapter import build_chat

from tests.unit.helpers import task_library_engine


def test_eval_set_is_mixed_deterministic_and_scored_fairly():
    tasks = ["int_to_roman", "roman_to_int", "count_vowels"]
    items = eval_set(tasks, per_task=50)
    assert len(items) == 150 and items == eval_set(tasks, per_task=50)
    assert {i.task for i in items[:30]} == set(tasks)  # shuffled together
    library = {"int_to_roman", "roman_to_int"}
    right = [Answer(i.answer, i.task) for i in items]
    half = [Answer(i.answer if n % 2 else "wrong", "int_to_roman") for n, i in enumerate(items)]
    table = accuracy_table(items, {"oracle": right, "select": half}, library)
    assert table["oracle"] == {"int_to_roman": 1.0, "roman_to_int": 1.0, "mean_in_domain": 1.0}
    select = table["select"]
    assert 0.3 < select["mean_in_domain"] < 0.7 and 0.3 < select["mean_out_domain"] < 0.7
    own = sum(i.task == "int_to_roman" for i in items if i.task in library) / 100
    assert select["top1_is_own_adapter"] == own
    twin = [Answer(i.answer, "int_to_roman-melora") for i in items]  # a task's MELoRA twin is its own adapter
    twins = accuracy_table(items, {"select": twin}, library, {"int_to_roman-melora": "int_to_roman"})
    assert twins["select"]["top1_is_own_adapter"] == own
    text = markdown(table)
    assert text.splitlines()[0] == "| task | oracle | select |" and "| mean_in_domain | 100% |" in text
    assert "| count_vowels | - |" in text  # no oracle for a task without an adapter


def test_top_adapter_prefers_gate_weights_then_scores():
    assert top_adapter([]) is None
    assert (
        top_adapter(
            [
                {"name": "a", "weight": 0.5, "score": 0.4, "gate_weight": 0.2},
                {"name": "b", "weight": 0.5, "score": 0.3, "gate_weight": 0.8},
            ]
        )
        == "b"
    )
    assert top_adapter([{"name": "a", "weight": 0.3, "score": 0.6}, {"name": "b", "weight": 0.7, "score": 0.5}]) == "a"


def test_router_mode_gates_retrievals_candidates_under_a_uniform_prior(tmp_path, tokenizer):
    # With a silent router (gain 0) the gate returns its prior, so `router` must answer exactly as a
    # uniform mixture of the retrieved candidates, and `gate` as the retrieval-score mixture.
    library = ("int_to_roman", "roman_to_int", "odd_or_even")
    # no floor: every prompt keeps all three candidates, whatever the random adapters' cards score
    engine = task_library_engine(tmp_path, tokenizer, library, max_model_len=256, retrieval_floor=-1.0)
    gate = MoLEGate(GateConfig.for_base("tiny", engine.model.lora_spec()))
    with torch.no_grad():
        gate.log_gain.fill_(-math.inf)
    engine.pool.attach_gate(gate)
    items = eval_set(list(library), per_task=2)
    hits = engine.selector.retriever.search(
        [i.prompt for i in items], engine.settings.retrieval_top_k, engine.settings.retrieval_floor
    )
    assert all(len(h) == 3 for h in hits)
    prompts = [
        tokenizer.apply_chat_template(
            build_chat(i.prompt), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for i in items
    ]

    def texts(selections):
        seqs = engine.generate(prompts, SamplingParams(max_tokens=6), selections=selections)
        return [tokenizer.decode(s.output_ids, skip_special_tokens=True) for s in seqs]

    uniform = texts([Selection("mixture", tuple(AdapterRef(n) for n, _ in h)) for h in hits])
    router = [a.text for a in engine_answers(engine, items, "router", 6, set(library))]
    gated = [a.text for a in engine_answers(engine, items, "gate", 6, set(library))]
    assert router == uniform and gated != uniform  # the two priors differ enough to change tokens


def test_handoff_writes_the_first_skills_part_a_separator_then_the_second_skills(tmp_path, tokenizer):
    library = ("add_3digit", "odd_or_even")
    engine = task_library_engine(tmp_path, tokenizer, library, max_model_len=256)
    items = eval_set(["sum_and_parity"], per_task=3)
    first = engine_answers(engine, items, "skill_a", 5, set(library))
    handoff = handoff_answers(engine, items, "handoff", 5, set(library))
    # the first part is skill_a's own answer, then ", " where its end token was, then skill_b's tokens
    prompts = [
        tokenizer.apply_chat_template(
            build_chat(i.prompt), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for i in items
    ]
    separator = tokenizer.encode(", ", add_special_tokens=False)
    for prompt, a, h in zip(prompts, first, handoff):
        head = tokenizer.encode(a.text, add_special_tokens=False) + separator
        [rest] = engine.generate([prompt + head], SamplingParams(max_tokens=5), [(AdapterRef("odd_or_even"),)])
        tail = [t for t in rest.output_ids if t not in engine.eos_token_ids]
        assert h.text == tokenizer.decode(head + tail, skip_special_tokens=True)
    table = handoff_table(items, {"handoff": handoff, "right": [Answer(i.answer, None) for i in items]})
    assert table["right"] == {"sum_and_parity": 1.0, "mean": 1.0, "mean_half_per_part": 1.0}


def test_composite_modes_ask_for_the_two_skills_and_score_best_single():
    items = eval_set(["sum_in_roman", "reverse_then_shift"], per_task=4)
    item = next(i for i in items if i.task == "sum_in_roman")
    library = set(TASKS)
    names = lambda sel: tuple(a.name for a in sel.explicit)  # noqa: E731
    assert names(selection("skill_a", item, library, 3)) == ("add_3digit",)
    assert names(selection("skill_b", item, library, 3)) == ("int_to_roman",)
    pair = selection("pair_gate", item, library, 3)
    assert pair.composition == "gate" and names(pair) == ("add_3digit", "int_to_roman")
    ties = selection("merge_ties", item, library, 3)
    assert (ties.composition, ties.merge.strategy, ties.merge.density) == ("merge", "ties", 0.5)
    assert selection("merge_linear", item, library, 3).merge.density == 1.0
    assert selection("base", item, library, 3) is None
    # the same selections as OpenAI requests
    assert request_body(None, "base-model") == ("base-model", {})
    assert request_body(selection("skill_b", item, library, 3), "b") == ("int_to_roman", {})
    assert request_body(selection("gate", item, library, 3), "b") == ("auto", {"composition": "gate"})
    assert request_body(ties, "b") == (
        "auto",
        {
            "composition": "merge",
            "adapters": ["add_3digit", "int_to_roman"],
            "merge": {"strategy": "ties", "density": 0.5},
        },
    )
    right = [Answer(i.answer, None, COMPOSITES[i.task].skills) for i in items]
    wrong = [Answer("no", None, COMPOSITES[i.task].skills[:1]) for i in items]
    half = [Answer(i.answer if i.task == "sum_in_roman" else "no", None) for i in items]
    table = composite_table(items, {"skill_a": wrong, "skill_b": half, "mixture": right, "gate": wrong})
    assert table["best_single"] == {"reverse_then_shift": 0.0, "sum_in_roman": 1.0, "mean": 0.5}
    assert table["mixture"]["both_skills_retrieved"] == 1.0 and table["gate"]["both_skills_retrieved"] == 0.0
    assert table["mixture"]["mean"] == 1.0 and "both_skills_retrieved" not in table["skill_a"]


def test_a_sequential_composite_gives_half_credit_per_part_and_a_single_part_at_most_half():
    dates = COMPOSITES["datetime_to_text"]
    want = "February 14, 2024, 7:53 PM"
    assert dates.parts_score(want, want) == 1.0
    assert dates.parts_score("February 14, 2024", want) == 0.5  # the date adapter's answer, then its end
    assert dates.parts_score("7:53 pm", want) == 0.5
    assert dates.parts_score("February 14, 2024, 19:53 AM", want) == 0.5
    assert dates.parts_score("February 15, 2024", want) == 0.0
    items = eval_set(["number_words_and_roman", "sum_in_roman"], per_task=2)
    first_part = [Answer(i.answer.split(", ")[0], None) for i in items]
    whole = [Answer(i.answer, None) for i in items]
    table = parts_table(items, {"skill_a": first_part, "skill_b": first_part, "gate": whole})
    assert set(table["gate"]) == {"number_words_and_roman", "mean", "one_part_then_end"}  # fused tasks: no parts
    assert table["skill_a"]["number_words_and_roman"] == 0.5 and table["skill_a"]["one_part_then_end"] == 1.0
    assert table["gate"]["mean"] == 1.0 and table["gate"]["one_part_then_end"] == 0.0
    assert table["best_single"] == {"number_words_and_roman": 0.5, "mean": 0.5}


def test_the_fused_composites_know_their_intermediate():
    items = eval_set(["sum_in_roman", "roman_to_words", "reverse_then_shift", "sum_and_parity"], per_task=3)
    for item in items:
        if item.task == "sum_in_roman":
            a, b = (int(n) for n in re.findall(r"\d+", item.prompt.replace(",", ""))[:2])
            assert item.intermediate == str(a + b) and TASKS["int_to_roman"].score(item.answer, item.answer)
        elif item.task == "reverse_then_shift":  # shifting the intermediate by one gives the answer
            assert caesar(item.intermediate) == item.answer.replace("-", "").replace(",", "").replace(" ", "")
        elif item.task == "roman_to_words":
            assert TASKS["number_to_words"].score(item.answer, to_words(int(item.intermediate)))
        else:
            assert item.intermediate == ""
    first_skill = [Answer(i.intermediate or "no", None) for i in items]
    table = intermediate_table(items, {"skill_a": first_skill, "gate": [Answer(i.answer, None) for i in items]})
    assert table["skill_a"] == {"reverse_then_shift": 1.0, "roman_to_words": 1.0, "sum_in_roman": 1.0}
    assert table["gate"] == {"reverse_then_shift": 0.0, "roman_to_words": 0.0, "sum_in_roman": 0.0}
