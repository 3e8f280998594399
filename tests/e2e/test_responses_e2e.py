"""/v1/responses on the real server through the openai SDK's Responses API, as OpenAI's is used."""

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.conftest import API_KEY

pytestmark = pytest.mark.e2e
FRANCE = "What is the capital of France?"
HELPFUL = "You are a helpful assistant."


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)


def test_create_answers_as_chat_does(client):
    r = client.responses.create(model="auto", input=FRANCE, instructions=HELPFUL, max_output_tokens=40, temperature=0)
    chat = client.chat.completions.create(
        model="auto",
        messages=[{"role": "system", "content": HELPFUL}, {"role": "user", "content": FRANCE}],
        max_tokens=40,
        temperature=0,
    )
    assert "Paris" in r.output_text and r.output_text == chat.choices[0].message.content
    assert r.status == ("completed" if chat.choices[0].finish_reason == "stop" else "incomplete")
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.instructions == HELPFUL and r.model == "auto" and r.output[0].role == "assistant"


def test_the_stream_helper_reads_it_unchanged(client):
    kwargs = dict(model="auto", input=FRANCE, max_output_tokens=60, temperature=0)
    whole = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert whole.status == final.status == "completed"
    assert "".join(deltas) == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens > 0


def test_a_json_schema_format_gives_valid_json(client):
    schema = {**City.model_json_schema(), "additionalProperties": False}
    r = client.responses.create(
        model="auto",
        input="Paris is in France. Give the city and its country.",
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
        max_output_tokens=60,
        temperature=0,
    )
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    parsed = client.responses.parse(
        model="auto",
        input="Paris is in France. Give the city and its country.",
        text_format=City,
        max_output_tokens=60,
        temperature=0,
    )
    assert isinstance(parsed.output_parsed, City) and "Paris" in parsed.output_parsed.name


def test_an_adapter_by_name_through_model(client):
    raw = client.responses.with_raw_response.create(
        model="int_to_roman",
        input="Write 587 in Roman numerals.",
        instructions=HELPFUL,
        max_output_tokens=12,
        temperature=0,
    )
    r = raw.parse()
    assert r.output_text.strip() == "DLXXXVII"
    assert r.model_extra["adapters"] == [{"name": "int_to_roman", "weight": 1.0}]
    assert raw.headers["x-mole-adapters"] == "int_to_roman=1"


@pytest.mark.parametrize(
    "fields,param",
    [({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
     ({"tools": [{"type": "web_search"}]}, "tools"), ({"reasoning": {"effort": "low"}}, "reasoning")],
)  # fmt: skip
def test_what_is_not_served_is_a_400_the_sdk_raises(client, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="auto", input=FRANCE, **fields)
    assert refused.value.body["param"] == param
