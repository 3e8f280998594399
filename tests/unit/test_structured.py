"""Structured outputs and tool calls: the grammar's mask, constrained and free requests in one
batch, and the OpenAI shapes (response_format, tools, tool_choice) over HTTP on a tiny model."""

from __future__ import annotations

import json
import threading

import jsonschema
import llguidance
import pytest
import torch
from fastapi.testclient import TestClient
from mole_serve.api.app import create_app
from mole_serve.api.protocol import ChatCompletionRequest
from mole_serve.api.structured import ToolUse, json_grammar, template_messages
from mole_serve.config import Settings
from mole_serve.engine.request import SamplingParams
from mole_serve.engine.structured import mask_logits
from mole_serve.routing.types import AdapterRef

from tests.unit.helpers import add_adapter, engine_for, make_adapter, served, tiny_hf_model

# Every value bounded, so that even a random model completes the object within a few tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "pick": {"enum": ["red", "green"]},
    },
    "required": ["ok", "n", "pick"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["unit", "days"],
            "additionalProperties": False,
        },
    },
}
ALARM = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "parameters": {
            "type": "object",
            "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
            "required": ["hour"],
            "additionalProperties": False,
        },
    },
}
USER = [{"role": "user", "content": "hi"}]


def test_the_mask_keeps_exactly_what_the_grammar_takes(tokenizer):
    engine = engine_for(tiny_hf_model(), tokenizer)
    matcher = engine.grammars.matcher(json_grammar(SCHEMA))
    matcher.consume_tokens(tokenizer('{"ok": true, "n": ')["input_ids"])
    logits = torch.randn(2, 49152)
    masked = mask_logits(logits, [None, matcher])
    assert torch.equal(masked[0], logits[0]) and mask_logits(logits, [None, None]) is logits
    allowed = (masked[1] > float("-inf")).nonzero().flatten().tolist()
    assert 0 < len(allowed) < 2000
    for token in allowed[:50]:  # each allowed token is one the grammar consumes ...
        assert matcher.deep_copy().consume_token(token), tokenizer.decode([token])
    for text in ["red", "true", " {"]:  # ... and none of these can follow `"n": `
        token = tokenizer(text)["input_ids"][0]
        assert token not in allowed and not matcher.deep_copy().consume_token(token)


def test_constrained_and_free_requests_share_a_batch(tokenizer, tmp_path):
    hf = tiny_hf_model()
    engine = engine_for(hf, tokenizer)
    make_adapter(hf, tmp_path / "a", seed=3)
    add_adapter(engine, "a", tmp_path / "a")
    grammar = json_grammar(SCHEMA)
    prompts = [list(range(5, 5 + n)) for n in (7, 12, 9, 4)]
    free = SamplingParams(max_tokens=12, ignore_eos=True)
    plans = [
        (free, ()),
        (SamplingParams(max_tokens=40, grammar=grammar), (AdapterRef("a"),)),
        (SamplingParams(max_tokens=40, temperature=1.0, seed=7, grammar=grammar), ()),
        (free, (AdapterRef("a"),)),
    ]
    alone = []
    for prompt, (sampling, adapters) in zip(prompts, plans):
        seq = engine.add_request(prompt, sampling, adapters)
        while not seq.is_finished:
            engine.step()
        alone.append(seq.output_ids)
    together = [engine.add_request(p, s, a) for p, (s, a) in zip(prompts, plans)]
    while engine.has_unfinished():
        engine.step()
    assert [s.output_ids for s in together] == alone
    for seq in together[1:3]:
        jsonschema.validate(json.loads(tokenizer.decode(seq.output_ids, skip_special_tokens=True)), SCHEMA)
        assert seq.finish_reason.value == "stop"


def test_tool_answers_are_read_as_calls():
    named = ToolUse("named", "get_weather").calls('{"unit": "c", "days": 2}')
    assert named[0][0].function.name == "get_weather" and named[1] is None
    calls, _ = ToolUse("required").calls('[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]')
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {})]
    calls, rest = ToolUse("auto").calls('Sure. <tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>')
    assert calls[0].function.name == "a" and rest == "Sure."
    assert ToolUse("auto").calls("no call here") is None
    assert ToolUse("named", "f").calls('{"cut short') is None  # max_tokens ended it: the text stays


def test_a_template_with_a_tool_format_gets_the_tools_and_the_tool_turns():
    body = ChatCompletionRequest.model_validate(
        {
            "tools": [WEATHER],
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"unit": "c"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
        }
    )
    messages, tools = template_messages(body, "{% for t in tools %}{{ t }}{% endfor %}")
    assert tools[0]["function"]["name"] == "get_weather"
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"unit": "c"}
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    told, tools = template_messages(body, "{{ messages }}")  # no tool format: told in the system turn
    assert tools is None and told[0]["role"] == "system" and "get_weather" in told[0]["content"]
    assert told[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"unit": "c"}}</tool_call>'


@pytest.fixture(scope="module")
def client(tokenizer):
    engine = engine_for(tiny_hf_model(), tokenizer, max_model_len=256)
    with TestClient(create_app(Settings(), lambda: served(engine))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        yield client


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 40, **body})


def test_json_schema_and_json_object(client):
    r = chat(
        client,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}},
    )
    message = r.json()["choices"][0]["message"]
    jsonschema.validate(json.loads(message["content"]), SCHEMA)
    assert r.json()["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in message
    assert message["role"] == "assistant"
    r = chat(client, response_format={"type": "json_object"}, max_tokens=3)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("{")


@pytest.mark.parametrize("stream", [False, True])
def test_required_tools_give_valid_calls(client, stream):
    r = chat(client, tools=[WEATHER, ALARM], tool_choice="required", parallel_tool_calls=False, stream=stream)
    if stream:
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        choice = chunks[-1]["choices"][0]
        calls = choice["delta"]["tool_calls"]
        assert all("tool_calls" not in c["choices"][0]["delta"] for c in chunks[:-1])
        assert [c["index"] for c in calls] == list(range(len(calls)))
    else:
        choice = r.json()["choices"][0]
        calls = choice["message"]["tool_calls"]
        assert choice["message"]["content"] is None
    assert choice["finish_reason"] == "tool_calls" and len(calls) == 1
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ALARM)}
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_a_named_function_is_called(client):
    r = chat(client, tools=[WEATHER, ALARM], tool_choice={"type": "function", "function": {"name": "set_alarm"}})
    call = r.json()["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "set_alarm"
    jsonschema.validate(json.loads(call["function"]["arguments"]), ALARM["function"]["parameters"])


def test_a_conversation_with_tool_turns_is_served(client):
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "set_alarm", "arguments": '{"hour": 7}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    r = client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "tools": [ALARM], "tool_choice": "none"}
    )
    assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"]


@pytest.mark.parametrize(
    "body, param, words",
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs `tools`"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "same name"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "cannot be combined",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "required"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
            "response_format.json_schema.schema",
            "strin",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "strict": True, "schema": {"not": {"type": "string"}}},
                }
            },
            "response_format.json_schema.schema",
            "not",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id", "required"),
    ],
)
def test_bad_structured_requests_are_clear_400s(client, body, param, words):
    r = chat(client, **body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error", r.text
    assert error["param"] == param and words in error["message"], error


def test_a_loose_schema_is_followed_where_it_can_be(client):
    """Without `strict`, keywords the grammar cannot enforce are ignored rather than refused."""
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
        "not": {"required": ["x"]},
    }
    r = chat(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert json.loads(r.json()["choices"][0]["message"]["content"])["ok"] in (True, False)


def test_the_grammar_library_refuses_what_it_cannot_enforce():
    assert "not" in llguidance.LLMatcher.validate_grammar(json_grammar({"not": {"type": "string"}}))
