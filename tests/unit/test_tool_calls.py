"""Tool calls an agent loop can use, over HTTP on a tiny random model with SmolLM2's tokenizer and
chat template (no tool format): `auto` (free text or calls, always well formed), the follow-up
turn, closed argument objects, bounded parallel calls, calls cut by max_tokens, and `none`.

A random model rarely writes `<tool_call>` on its own: Steer biases the logits toward a token
sequence (before the grammar's mask, as a model that wants it would), so that each branch of a
grammar is walked."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import jsonschema
import pytest
from fastapi.testclient import TestClient
from mole_serve.api.app import create_app
from mole_serve.api.protocol import ChatCompletionRequest
from mole_serve.api.structured import ToolUse, closed, output_constraint
from mole_serve.config import Settings
from mole_serve.engine.structured import GrammarMatchers

from tests.unit.helpers import engine_for, served, tiny_hf_model
from tests.unit.test_structured import ALARM, WEATHER

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ALARM)}
MARKER = "<tool_call>"
STEER = 30.0  # a bias past any logit of the random model: the steered token is all but sure
ASK = [{"role": "user", "content": "What is the weather like?"}]
FOLLOW_UP = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"unit": "c", "days": 1}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]
# Jinja with a tool format (it reads `tools`), calls and results written Hermes' way
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Steer:
    """While set, a bias on the next token of a sequence `ids` in every sampled row: the one after
    the longest start of `ids` the row's output ends with (the first, after none or all of it)."""

    def __init__(self, engine) -> None:
        self.ids: list[int] = []
        self.bias = 0.0
        forward = engine.runner.forward_logits

        def biased(batch):
            logits = forward(batch)  # [N, V], a row per sampled sequence
            if not self.ids:
                return logits
            logits = logits.clone()
            for row, seq in enumerate(s.seq for s in batch.scheduled if s.samples):
                logits[row, self.ids[self._matched(seq.output_ids) % len(self.ids)]] += self.bias
            return logits

        engine.runner.forward_logits = biased

    def _matched(self, output: list[int]) -> int:
        return next((k for k in range(min(len(self.ids), len(output)), 0, -1) if output[-k:] == self.ids[:k]), 0)

    def toward(self, ids: list[int], bias: float) -> None:
        self.ids, self.bias = ids, bias


@contextmanager
def serving(engine) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(), lambda: served(engine))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        yield client


def tiny_engine(tokenizer):
    hf = tiny_hf_model()
    hf.config.max_position_embeddings = 1024  # the told tools take ~200 tokens (rope has no weights)
    return engine_for(hf, tokenizer, max_model_len=1024)


@pytest.fixture(scope="module")
def steered(tokenizer):
    engine = tiny_engine(tokenizer)
    steer = Steer(engine)
    with serving(engine) as client:
        yield client, steer


@pytest.fixture
def client(steered):
    client, steer = steered
    yield client
    steer.toward([], 0.0)


@pytest.fixture
def steer(steered):
    return steered[1]


def marker_ids(tokenizer) -> list[int]:
    return tokenizer(MARKER)["input_ids"]


def chat(client, **body) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 80, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def streamed(client, **body) -> tuple[list[dict], dict]:
    """(every chunk's choice, the last one)"""
    r = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 80, "stream": True, **body})
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    return choices, choices[-1]


def assert_valid_calls(calls: list[dict]) -> None:
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


@pytest.mark.parametrize("seed", range(6))
def test_auto_without_a_tool_format_answers_text_or_calls_that_parse(client, steer, tokenizer, seed):
    """`tools` alone means `auto`: whatever the model leans to, the answer is text without a call
    in it, or calls whose arguments match their function (at most one per tool)."""
    kinds = set()
    for bias in (0.0, STEER):
        steer.toward(marker_ids(tokenizer), bias)
        choice = chat(client, tools=[WEATHER, ALARM], seed=seed)
        message = choice["message"]
        assert MARKER not in (message["content"] or "")
        if "tool_calls" in message:
            assert choice["finish_reason"] == "tool_calls" and 1 <= len(message["tool_calls"]) <= 2
            assert_valid_calls(message["tool_calls"])
            kinds.add("calls")
        else:
            assert choice["finish_reason"] in ("stop", "length")
            kinds.add("text")
    assert kinds == {"text", "calls"}  # unsteered the random model writes text; steered, it calls


@pytest.mark.parametrize("stream", [False, True])
def test_the_follow_up_turn_with_the_tools_attached(client, stream):
    """An assistant turn holding calls and the `tool` result, the tools still sent (agent loops do)."""
    body = {"messages": FOLLOW_UP, "tools": [WEATHER], "seed": 1}
    if stream:
        choices, last = streamed(client, **body)
        assert last["finish_reason"] in ("stop", "length", "tool_calls")
    else:
        assert chat(client, **body)["finish_reason"] in ("stop", "length", "tool_calls")


def test_the_follow_up_turn_on_a_template_with_a_tool_format(tokenizer):
    hermes = copy.deepcopy(tokenizer)
    hermes.chat_template = HERMES_TEMPLATE
    with serving(tiny_engine(hermes)) as client:
        choice = chat(client, messages=FOLLOW_UP, tools=[WEATHER], max_tokens=8)
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]


def test_argument_schemas_are_closed_where_they_list_properties():
    item = {"type": "object", "properties": {"x": {"type": "integer"}}}
    schema = {
        "type": "object",
        "properties": {
            "place": {"type": "object", "properties": {"city": {"type": "string"}}},
            "tags": {"type": "array", "items": item},
            "either": {"anyOf": [item, {"type": "null"}]},
            "free": {"type": "object"},
            "open": {"type": "object", "properties": {"a": {}}, "additionalProperties": True},
            "ref": {"$ref": "#/$defs/Item"},
        },
        "$defs": {"Item": item},
    }
    out = closed(schema)
    assert out["additionalProperties"] is False
    props = out["properties"]
    assert props["place"]["additionalProperties"] is False
    assert props["tags"]["items"]["additionalProperties"] is False
    assert props["either"]["anyOf"][0]["additionalProperties"] is False
    assert out["$defs"]["Item"]["additionalProperties"] is False
    assert "additionalProperties" not in props["free"]  # no properties listed: a free-form mapping
    assert props["open"]["additionalProperties"] is True  # the schema says so
    assert "additionalProperties" not in schema  # the request's schema is left as it came


def written(mode: str, arguments: dict) -> str:
    """A call to `lookup` as the answer holds it under each tool_choice."""
    call = {"name": "lookup", "arguments": arguments}
    if mode == "required":
        return json.dumps([call])
    return f"{MARKER}{json.dumps(call)}</tool_call>" if mode == "auto" else json.dumps(arguments)


@pytest.mark.parametrize("mode", ["named", "required", "auto"])
def test_the_grammar_takes_no_key_the_function_does_not_list(tokenizer, mode):
    """A schema without additionalProperties: the listed keys only, nested too, in every tool_choice."""
    tool = {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "object", "properties": {"s": {}}}}},
        },
    }
    choice = {"type": "function", "function": {"name": "lookup"}} if mode == "named" else mode
    body = ChatCompletionRequest.model_validate({"messages": ASK, "tools": [tool], "tool_choice": choice})
    grammar, _ = output_constraint(body, tokenizer.chat_template)
    matchers = GrammarMatchers(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    matcher = matchers.matcher(grammar)
    assert matcher.consume_tokens(tokenizer(written(mode, {"q": {"s": 1}}))["input_ids"]) and matcher.is_accepting()
    for stray in ({"q": {"s": 1}, "more": 2}, {"q": {"s": 1, "t": 2}}):
        assert not matchers.matcher(grammar).consume_tokens(tokenizer(written(mode, stray))["input_ids"])


def comma_ids(tokenizer) -> list[int]:
    return [i for i in range(len(tokenizer)) if "," in tokenizer.decode([i])]


@pytest.mark.parametrize("stream", [False, True])
def test_required_parallel_calls_end_at_one_per_tool(client, steer, tokenizer, stream):
    """A model that always wants one more call (steered to `,` after each) stops at one per tool,
    well before max_tokens."""
    steer.toward(comma_ids(tokenizer), STEER)
    body = {"tools": [WEATHER, ALARM], "tool_choice": "required", "max_tokens": 400, "seed": 3}
    if stream:
        _, last = streamed(client, **body)
        calls = last["delta"]["tool_calls"]
    else:
        last = chat(client, **body)
        calls = last["message"]["tool_calls"]
    assert last["finish_reason"] == "tool_calls" and len(calls) == 2
    assert_valid_calls(calls)


def test_auto_parallel_calls_end_at_one_per_tool(client, steer, tokenizer):
    steer.toward(marker_ids(tokenizer), STEER)
    choice = chat(client, tools=[WEATHER, ALARM], max_tokens=400, seed=4)
    assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 2
    single = chat(client, tools=[WEATHER, ALARM], max_tokens=400, seed=4, parallel_tool_calls=False)
    assert single["finish_reason"] == "tool_calls" and len(single["message"]["tool_calls"]) == 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}, "auto"])
def test_a_call_cut_by_max_tokens_is_length_without_content(client, steer, tokenizer, choice, stream):
    steer.toward(marker_ids(tokenizer), STEER)  # (auto: into a call at once)
    body = {"tools": [WEATHER, ALARM], "tool_choice": choice, "max_tokens": 9, "seed": 5}
    if stream:
        choices, last = streamed(client, **body)
        assert all("tool_calls" not in c["delta"] and not c["delta"].get("content") for c in choices)
    else:
        last = chat(client, **body)
        assert last["message"]["content"] is None and "tool_calls" not in last["message"]
    assert last["finish_reason"] == "length"


def test_a_cut_auto_answer_keeps_the_text_before_the_call():
    auto = ToolUse("auto")
    assert auto.answer('Let me see. <tool_call>{"name": "get_we', "length") == ("Let me see.", None, "length")
    assert auto.answer("A plain answer, cut ", "length") == ("A plain answer, cut ", None, "length")


def test_none_with_tools_is_plain_text(client, steer, tokenizer):
    """The history shows calls the model could copy; `none` writes none, even steered to."""
    steer.toward(marker_ids(tokenizer), STEER)
    for seed in range(3):
        choice = chat(client, messages=FOLLOW_UP, tools=[WEATHER], tool_choice="none", max_tokens=30, seed=seed)
        assert "tool_calls" not in choice["message"] and MARKER not in choice["message"]["content"]
