"""POST /v1/responses on a tiny random model: the answer and every stream event validated against
the openai SDK's own Responses types, the SDK itself against a live server, the refusals."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from mole_serve.api.app import create_app
from mole_serve.config import Settings
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.unit.helpers import add_adapter, engine_for, live_server, make_adapter, served, tiny_hf_model
from tests.unit.test_api import DiesAfter

SDK_EVENT = TypeAdapter(ResponseStreamEvent)
# a grammar that leaves one answer, then the end: the random model's answer completes
ONE_KEY = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"format": {"type": "json_schema", "name": "verdict", "schema": ONE_KEY, "strict": True}}


@pytest.fixture(scope="module")
def app(tokenizer, tmp_path_factory):
    hf = tiny_hf_model()
    engine = engine_for(hf, tokenizer, max_model_len=256)
    add_adapter(engine, "a1", make_adapter(hf, tmp_path_factory.mktemp("a1"), seed=1))
    return create_app(Settings(), lambda: served(engine))


@pytest.fixture(scope="module")
def url(app):
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/responses", json=body, timeout=60)


def events(r: httpx.Response) -> list[dict]:
    """The SSE events, each checked: its `event:` line names its data's type."""
    out = []
    for block in r.text.strip().split("\n\n"):
        name, data = block.split("\n")
        out.append(json.loads(data.removeprefix("data: ")))
        assert name == f"event: {out[-1]['type']}"
    return out


def test_a_cut_answer_is_incomplete_in_the_sdks_shape(url):
    body = {
        "model": "auto",
        "input": "hi",
        "instructions": "Answer briefly.",
        "max_output_tokens": 4,
        "ignore_eos": True,
        "metadata": {"run": "7"},
        "user": "u1",
    }
    r = post(url, body)
    assert r.status_code == 200, r.text
    response = Response.model_validate(r.json())
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.completed_at is None and response.error is None
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert response.output_text == message.content[0].text and response.output_text
    assert response.id.startswith("resp_") and message.id.startswith("msg_") and response.object == "response"
    assert response.metadata == {"run": "7"} and response.user == "u1" and response.instructions == "Answer briefly."
    assert response.max_output_tokens == 4 and response.model == "auto" and response.tools == []
    assert r.json()["store"] is False and r.json()["adapters"] == []
    usage = response.usage
    assert usage.output_tokens == 4 and usage.total_tokens == usage.input_tokens + 4
    # `instructions` is a system turn before the input: the same prompt as chat's
    chat = {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}]}
    r = httpx.post(f"{url}/v1/chat/completions", json={**chat, "max_tokens": 1}, timeout=60)
    assert r.json()["usage"]["prompt_tokens"] == usage.input_tokens


def test_input_messages_read_as_the_chat_they_are(url):
    turns = [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "input_text", "text": "2+2"}, {"type": "input_text", "text": "?"}]},
        {"type": "message", "role": "assistant", "id": "msg_0", "status": "completed",
         "content": [{"type": "output_text", "text": "4", "annotations": []}]},
        {"role": "user", "content": "and 3+3?"},
    ]  # fmt: skip
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    greedy = {"max_tokens": 3, "temperature": 0, "ignore_eos": True}
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, **greedy}, timeout=60).json()
    r = post(url, {"input": turns, "max_output_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert r.json()["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert r.json()["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]


def test_a_json_schema_format_completes_with_valid_json(url):
    r = post(url, {"input": "Is the sky blue?", "text": JSON_SCHEMA, "max_output_tokens": 20})
    response = Response.model_validate(r.json())
    assert response.status == "completed" and response.incomplete_details is None and response.completed_at
    assert set(json.loads(response.output_text)) == {"ok"}
    assert response.text.format.type == "json_schema" and response.text.format.schema_ == ONE_KEY
    r = post(url, {"input": "Any JSON", "text": {"format": {"type": "json_object"}}, "max_output_tokens": 8})
    assert r.status_code == 200 and r.json()["output"][0]["content"][0]["text"].startswith("{")


def test_the_stream_is_the_sdks_event_sequence(url):
    r = httpx.post(
        f"{url}/v1/responses",
        json={"input": "hi", "max_output_tokens": 6, "ignore_eos": True, "stream": True},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    sent = events(r)
    parsed = [SDK_EVENT.validate_python(e) for e in sent]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    kinds = [e.type for e in parsed]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1 and kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    created, final = parsed[0].response, parsed[-1].response
    assert created.status == "in_progress" and created.output == [] and created.usage is None
    assert final.id == created.id and final.status == "incomplete" and final.usage.output_tokens == 6
    text = "".join(e.delta for e in parsed if e.type == "response.output_text.delta")
    assert text == final.output_text == parsed[-4].text == parsed[-3].part.text
    item_id = parsed[2].item.id
    assert final.output[0].id == item_id and parsed[-2].item.status == "incomplete"
    assert {e.item_id for e in parsed[3:-2]} == {item_id}
    assert {(e.output_index, e.content_index) for e in parsed[3:-2]} == {(0, 0)}


def test_the_sdk_creates_and_streams_unchanged(client):
    response = client.responses.create(
        model="auto", input="Is the sky blue?", instructions="Answer in JSON.", text=JSON_SCHEMA
    )
    assert response.status == "completed" and set(json.loads(response.output_text)) == {"ok"}
    with client.responses.stream(model="auto", input="Is the sky blue?", text=JSON_SCHEMA) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert set(json.loads(final.output_text)) == {"ok"} and final.usage.output_tokens > 0


def test_the_route_is_counted_in_the_metrics(url):
    def count(name: str) -> float:
        lines = httpx.get(f"{url}/metrics").text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith(name))

    latency = 'mole_request_latency_seconds_count{route="/v1/responses"}'
    answered = 'mole_http_requests_total{route="/v1/responses",status="200"}'
    before = count(latency), count(answered), count("mole_completion_tokens_total")
    post(url, {"input": "hi", "max_output_tokens": 3, "ignore_eos": True})
    assert (count(latency), count(answered), count("mole_completion_tokens_total")) == (
        before[0] + 1,
        before[1] + 1,
        before[2] + 3,
    )


def test_an_adapter_by_name_and_the_extensions_report_as_on_chat(url):
    r = post(url, {"model": "a1", "input": "hi", "max_output_tokens": 2})
    assert r.json()["adapters"] == [{"name": "a1", "weight": 1.0}] and r.headers["x-mole-adapters"] == "a1=1"
    body = {"input": "hi", "max_output_tokens": 2, "adapters": [{"name": "a1", "weight": 2}], "composition": "mixture"}
    assert post(url, body).json()["adapters"] == [{"name": "a1", "weight": 1.0}]
    sent = events(post(url, {**body, "stream": True}))
    assert sent[0]["response"]["adapters"] == sent[-1]["response"]["adapters"] == [{"name": "a1", "weight": 1.0}]


@pytest.mark.parametrize(
    "fields,status,param",
    [
        ({"store": True}, 400, "store"),
        ({"previous_response_id": "resp_1"}, 400, "previous_response_id"),
        ({"conversation": "conv_1"}, 400, "conversation"),
        ({"background": True}, 400, "background"),
        ({"prompt": {"id": "pmpt_1"}}, 400, "prompt"),
        ({"tools": [{"type": "web_search"}]}, 400, "tools"),
        ({"tool_choice": "required"}, 400, "tool_choice"),
        ({"reasoning": {"effort": "low"}}, 400, "reasoning"),
        ({"include": ["message.output_text.logprobs"]}, 400, "include"),
        ({"top_logprobs": 2}, 400, "top_logprobs"),
        ({"truncation": "auto"}, 400, "truncation"),
        ({"prompt_cache_key": "k"}, 400, "prompt_cache_key"),
        ({"stream_options": {"include_obfuscation": True}}, 400, "stream_options.include_obfuscation"),
        ({"text": {"verbosity": "low"}}, 400, "text.verbosity"),
        ({"n": 2}, 400, "n"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, 400,
         "text.format.schema"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
        ({"max_output_tokens": 10_000}, 400, "input"),
        ({"model": "missing"}, 404, "model"),
        ({"adapters": ["missing"]}, 404, "adapters"),
    ],
)  # fmt: skip
def test_what_is_not_implemented_is_refused_naming_the_field(url, fields, status, param):
    r = post(url, {"input": "hi", **fields})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"], error


def test_the_refusals_say_why(url):
    assert "not stored" in post(url, {"input": "hi", "store": True}).json()["error"]["message"]
    assert "not stored" in post(url, {"input": "hi", "previous_response_id": "r"}).json()["error"]["message"]
    image = {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}
    assert "input.0.content.0: content part of type 'input_image'" in post(url, image).json()["error"]["message"]
    r = post(url, {"input": "hi", "max_output_tokens": 10_000})
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_values_that_ask_for_nothing_are_accepted(url):
    nothing = {
        "store": False,
        "background": False,
        "tools": [],
        "tool_choice": "none",
        "include": [],
        "truncation": "disabled",
        "service_tier": "auto",
        "parallel_tool_calls": False,
        "stream_options": {"include_obfuscation": False},
        "text": {"format": {"type": "text"}},
        "safety_identifier": "s1",
    }
    r = post(url, {"input": "hi", "max_output_tokens": 1, **nothing})
    assert r.status_code == 200, r.text
    echoed = r.json()
    assert echoed["tool_choice"] == "none" and echoed["parallel_tool_calls"] is False
    assert echoed["safety_identifier"] == "s1" and echoed["text"]["format"] == {"type": "text"}


def test_openapi_documents_the_route_and_its_events(url):
    schema = httpx.get(f"{url}/openapi.json").json()
    operation = schema["paths"]["/v1/responses"]["post"]
    content = operation["responses"]["200"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ResponseObject"}
    event = content["text/event-stream"]["schema"]["properties"]["data"]["contentSchema"]
    assert event == {"$ref": "#/components/schemas/ResponseStreamEvent"}
    assert {"ResponseObject", "ResponseStreamEvent", "TextDeltaEvent"} <= set(schema["components"]["schemas"])
    assert operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")


def test_an_error_mid_stream_is_an_error_event(app, url, monkeypatch):
    generate = app.state.engine.generate
    monkeypatch.setattr(app.state.engine, "generate", lambda *a, **kw: DiesAfter(generate(*a, **kw), 3))
    r = post(url, {"input": "hi", "max_output_tokens": 8, "ignore_eos": True, "stream": True})
    sent = events(r)
    assert r.status_code == 200 and sent[-1]["type"] == "error"
    error = SDK_EVENT.validate_python(sent[-1])
    assert error.code == "server_error" and "replica" in error.message
    assert error.sequence_number == len(sent) - 1
    assert any(e["type"] == "response.output_text.delta" for e in sent)  # the text before it went out
