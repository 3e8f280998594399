"""Task generators and the adapter trainer, on a tiny random Llama and Phi-3 (the real tokenizer, no
real weights)."""

from __future__ import annotations

import calendar
import json
import random
import re
from dataclasses import replace

import pytest
import torch
from mole_serve.config import Settings
from mole_serve.engine.loader import resolve_base_model
from mole_serve.routing.types import AdapterRef
from mole_serve.spelling import letter_token_ids
from mole_serve.training.tasks import COMPOSITES, HELD_OUT_FRAMES, TASKS, TRAIN_FRAMES, frame, to_roman
from mole_serve.training.train_adapter import (
    PEFT_FILES,
    TrainOptions,
    build_chat,
    collate,
    library_table,
    train_adapter,
)
from peft import PeftModel
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from tests.unit.helpers import TINY_SHAPE, add_adapter, engine_for
from tests.unit.test_moe_kinds import oracle_logits, step_logits


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_base_model(Settings()))


def tiny_trainable(tokenizer, config_class, model_class, seed: int = 0, **fields):
    """A tiny random model of the tokenizer's vocabulary. initializer_range 0.2: with the default 0.02
    the tied head cannot move logits far, so no loss can fall."""
    torch.manual_seed(seed)
    config = config_class(
        **{
            **TINY_SHAPE,
            "vocab_size": len(tokenizer),
            "initializer_range": 0.2,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **fields,
        }
    )
    return model_class(config).eval()


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    # max_position_embeddings: LlamaConfig's default, what these tests were written against
    return tiny_trainable(
        tokenizer, LlamaConfig, LlamaForCausalLM, seed, tie_word_embeddings=True, max_position_embeddings=2048
    )


def tiny_phi3(tokenizer, seed: int = 0) -> Phi3ForCausalLM:
    """A Phi-3: its checkpoint and transformers' modules fuse qkv_proj and gate_up_proj."""
    return tiny_trainable(
        tokenizer,
        Phi3Config,
        Phi3ForCausalLM,
        seed,
        original_max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
    )


# --- tasks ------------------------------------------------------------------------------------


def test_registry_has_enough_tasks_and_families():
    assert len(TASKS) >= 12
    assert len({t.family for t in TASKS.values()}) >= 4


@pytest.mark.parametrize("name", sorted(TASKS) + sorted(COMPOSITES))
def test_task_is_deterministic_with_disjoint_splits(name):
    task = TASKS.get(name) or COMPOSITES[name]
    train_templates, eval_templates = task.templates_for("train"), task.templates_for("eval")
    assert len(set(train_templates)) >= 30 and len(set(eval_templates)) >= 10
    assert not set(train_templates) & set(eval_templates)
    assert task.templates_for("eval_inputs") == train_templates
    assert task.examples("train", 50, seed=3) == task.examples("train", 50, seed=3)
    assert task.examples("train", 50, seed=3) != task.examples("train", 50, seed=4)
    train = {key for key, _, _ in task.draw("train", 400, seed=0)}
    for split in ("eval", "eval_inputs"):
        held_out = task.draw(split, 64, seed=0)
        assert len(held_out) == 64 and len({p for _, p, _ in held_out}) == 64
        assert not train & {key for key, _, _ in held_out}  # whatever format an input was written in
        assert all(task.score(answer, answer) for _, _, answer in held_out)


def test_held_out_phrasings_use_frames_and_asks_no_task_trains_on():
    for task in TASKS.values():
        train = set(task.templates_for("train"))
        assert not train & {frame(style, task.asks[-1]) for style in TRAIN_FRAMES} and task.questions[-1] not in train
        for style in HELD_OUT_FRAMES:
            assert frame(style, task.asks[0]) in task.templates_for("eval")


def test_composite_answers_join_their_two_skills():
    shapes = [c.shape for c in COMPOSITES.values()]
    assert len(COMPOSITES) >= 6 and shapes.count("sequential") >= 2 and shapes.count("fused") >= 2
    assert all(len(c.skills) == 2 and set(c.skills) <= set(TASKS) for c in COMPOSITES.values())
    fields, answer, _ = COMPOSITES["datetime_to_text"].make(random.Random(0), "iso")
    date, time = fields["dt"].split("T")
    (y, m, d), (h, mi) = map(int, date.split("-")), map(int, time.split(":"))
    assert answer == f"{calendar.month_name[m]} {d}, {y}, {h % 12 or 12}:{mi:02d} {'AM' if h < 12 else 'PM'}"
    fields, answer, _ = COMPOSITES["sum_in_roman"].make(random.Random(3), "plain")
    assert answer == to_roman(fields["a"] + fields["b"])
    fields, answer, _ = COMPOSITES["reverse_then_shift"].make(random.Random(3), "word")
    assert answer == "".join(chr((ord(c) - 96) % 26 + 97) for c in fields["w"][::-1])
    assert COMPOSITES["sum_and_parity"].score("1133 , Odd.", "1133, odd")


def test_inputs_come_in_the_formats_people_type():
    reverse = TASKS["reverse_letters"]
    prompts = [p for _, p, _ in reverse.draw("train", 300, seed=0)]
    assert any(", " in p for p in prompts) and any(re.search(r"\b[a-z]{5,}\b", p) and "letters" in p for p in prompts)
    words = {reverse.make(random.Random(s), fmt)[0]["w"] for s in range(3) for fmt in ("word", "spaced", "dash")}
    assert any("-" in w for w in words) and any(" " in w for w in words)
    fields, answer, key = reverse.make(random.Random(0), "comma")
    assert answer == ", ".join(key[::-1]) and fields["w"] == ", ".join(key)
    # a held-out format only in the held-out phrasing split
    dashes = [p for _, p, _ in reverse.draw("eval", 200, seed=0) if re.search(r"[a-z]-[a-z]-[a-z]", p)]
    assert dashes and not any(re.search(r"[a-z]-[a-z]-[a-z]", p) for p in prompts)
    times = {TASKS["time_24h_to_12h"].make(random.Random(1), f)[0]["t"] for f in ("colon", "short", "compact", "h")}
    assert len(times) == 4 and {TASKS["time_24h_to_12h"].make(random.Random(1), f)[1] for f in ("colon", "h")} == {
        TASKS["time_24h_to_12h"].make(random.Random(1), "colon")[1]
    }
    assert TASKS["odd_or_even"].make(random.Random(5), "comma")[2].isdigit()


@pytest.mark.parametrize(
    "name,prediction,answer",
    [
        ("int_to_roman", " cdxxv.", "CDXXV"),
        ("roman_to_int", "1,319", "1319"),
        ("add_3digit", "1319.", "1319"),
        ("number_to_words", "Five hundred and twenty one", "five hundred twenty-one"),
        ("reverse_letters", "xbdc", "x b d c"),
        ("sort_letters", "B, C, D", "b c d"),
        ("sort_letters", "b-c-d", "bcd"),
        ("number_to_words", "Two thousand, forty-one", "two thousand forty-one"),
        ("time_24h_to_12h", "2:05 p.m.", "2:05 PM"),
        ("iso_date_to_text", "march 5, 2024.", "March 5, 2024"),
        ("kv_to_json", '```json\n{"age":31,"name":"Bob"}\n```', '{"name": "Bob", "age": 31}'),
        ("review_sentiment", "Positive.", "positive"),
    ],
)
def test_scorers_accept_normalized_answers(name, prediction, answer):
    assert TASKS[name].score(prediction, answer)


@pytest.mark.parametrize(
    "name,prediction,answer",
    [
        ("add_3digit", "The sum is 1319.", "1319"),
        ("reverse_letters", "x b c d", "x b d c"),
        ("kv_to_json", '{"name": "Bob", "age": 32}', '{"name": "Bob", "age": 31}'),
        ("odd_or_even", "even", "odd"),
    ],
)
def test_scorers_reject_wrong_answers(name, prediction, answer):
    assert not TASKS[name].score(prediction, answer)


# --- training ---------------------------------------------------------------------------------


def test_collate_marks_only_answer_tokens(tokenizer):
    batch = collate(tokenizer, [("Is 7 odd or even?", "odd"), ("Is 12345 odd or even?", "even")])
    targets = batch["input_ids"][batch["rows"], batch["cols"]].tolist()
    eos = [tokenizer.eos_token_id]
    answers = [tokenizer(a, add_special_tokens=False).input_ids + eos for a in ("odd", "even")]
    assert targets == answers[0] + answers[1]
    assert build_chat("hi")[0]["role"] == "system"


def test_train_adapter_writes_a_loadable_peft_adapter(tokenizer, tmp_path):
    opts = TrainOptions(steps=30, batch=4, lr=1e-2, warmup=2, stop_loss=0.0, n_eval=4, n_card_examples=5)
    out = tmp_path / "odd_or_even"
    card = train_adapter(
        "odd_or_even", out, opts, model=tiny_llama(tokenizer), tokenizer=tokenizer, base_model_name="tiny-llama"
    )
    assert card["final_loss"] < card["first_loss"] - 2.0  # from ~12.5 nats on this random model
    assert sorted(p.name for p in out.iterdir()) == sorted([*PEFT_FILES, "card.json"])
    saved = json.loads((out / "card.json").read_text())
    assert saved["base_model"] == "tiny-llama" and len(saved["examples"]) == 5
    assert saved["training"]["rank"] == 8 and saved["steps"] == 30
    assert 0.0 <= saved["adapter_accuracy"] <= 1.0
    assert "| odd_or_even |" in library_table(tmp_path)

    ids = collate(tokenizer, [("Is 41 odd or even?", "odd")])["input_ids"]
    with torch.no_grad():
        base_logits = tiny_llama(tokenizer)(input_ids=ids).logits
        lora = PeftModel.from_pretrained(tiny_llama(tokenizer), out).eval()
        lora_logits = lora(input_ids=ids).logits
    assert not torch.allclose(base_logits, lora_logits, atol=1e-4)

    # --resume continues from those weights (loss starts where it ended) and counts every step; the
    # card keeps its examples, retrieval's keys, though another seed draws other prompts, and the
    # adapter's own rank and alpha, whatever the options say (by_name_only: a card retrieval never picks)
    resumed = train_adapter(
        "odd_or_even",
        out,
        replace(opts, steps=5, seed=1, resume=str(out), by_name_only=True, rank=opts.rank * 2, alpha=opts.alpha * 2),
        model=tiny_llama(tokenizer),
        tokenizer=tokenizer,
        base_model_name="tiny-llama",
    )
    assert resumed["steps"] == 35 and resumed["first_loss"] < card["first_loss"] - 2.0
    assert resumed["examples"] == card["examples"]
    assert (resumed["training"]["rank"], resumed["training"]["alpha"]) == (opts.rank, opts.alpha)
    assert "auto" not in card and json.loads((out / "card.json").read_text())["auto"] is False
    with torch.no_grad():
        again = PeftModel.from_pretrained(tiny_llama(tokenizer), out).eval()(input_ids=ids).logits
    assert not torch.allclose(again, lora_logits, atol=1e-6)


def test_a_letter_task_trains_on_spelled_input_and_its_card_says_so(tokenizer, tmp_path):
    opts = TrainOptions(steps=2, batch=2, warmup=1, stop_loss=0.0, n_eval=2, n_card_examples=2)
    card = train_adapter(
        "reverse_letters",
        tmp_path / "rev",
        opts,
        model=tiny_llama(tokenizer),
        tokenizer=tokenizer,
        base_model_name="tiny-llama",
    )
    assert TASKS["reverse_letters"].spelled and card["input"] == "spelled"
    plain = train_adapter(
        "odd_or_even",
        tmp_path / "odd",
        opts,
        model=tiny_llama(tokenizer),
        tokenizer=tokenizer,
        base_model_name="tiny-llama",
    )
    assert "input" not in plain
    # the batch holds the spelled prompt, and the answer one token per letter
    batch = collate(tokenizer, [("Reverse planet", "tenalp")], spelled=True)
    answer = batch["input_ids"][batch["rows"], batch["cols"]].tolist()
    assert answer == [*letter_token_ids(tokenizer, "tenalp"), tokenizer.eos_token_id]
    assert "(p l a n e t)" in tokenizer.decode(batch["input_ids"][0])


def test_a_lora_trained_on_phi3_targets_its_fused_modules_and_serves_as_peft_runs_it(tokenizer, tmp_path):
    """The default targets are the base model's modules by name (Phi-3's fused qkv_proj and
    gate_up_proj); the engine serves what PEFT trained as PEFT runs it. Kinds that train on the
    separate projections are refused on it."""
    opts = TrainOptions(steps=3, batch=2, lr=1e-2, warmup=1, stop_loss=0.0, n_eval=2, n_card_examples=2)
    out = tmp_path / "odd_or_even"
    card = train_adapter(
        "odd_or_even", out, opts, model=tiny_phi3(tokenizer), tokenizer=tokenizer, base_model_name="tiny-phi3"
    )
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert list(card["training"]["targets"]) == targets
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == sorted(targets)

    engine = engine_for(tiny_phi3(tokenizer), tokenizer)
    add_adapter(engine, "odd", out)
    prompt = collate(tokenizer, [("Is 41 odd or even?", "odd")])["input_ids"][0].tolist()
    output, ours = step_logits(engine, prompt, [AdapterRef("odd")], tokens=4)
    ref = oracle_logits(PeftModel.from_pretrained(tiny_phi3(tokenizer), out).eval(), prompt, output)
    assert (ref - oracle_logits(tiny_phi3(tokenizer), prompt, output)).abs().max() > 1e-3  # it trained
    assert (ours - ref).abs().max() < 1e-4

    with pytest.raises(ValueError, match="which phi3 fuses"):
        train_adapter("odd_or_even", tmp_path / "mix", replace(opts, kind="mixlora"), model=tiny_phi3(tokenizer))
