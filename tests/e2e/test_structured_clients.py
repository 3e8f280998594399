"""Structured outputs from the real server through clients nobody here wrote: the openai SDK's
`.parse()` and LangChain's `with_structured_output` in its three methods."""

import json

import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.e2e.conftest import API_KEY

pytestmark = pytest.mark.e2e
ASK = "Ada Lovelace was 36 years old. Give her name and age."


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=150)


@pytest.fixture(scope="module")
def base_model(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY).models.list().data[0].id


def chat_model(server: str, model: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{server}/v1", api_key=API_KEY, model=model, max_tokens=60, temperature=0)


def test_the_sdk_parse_gives_the_model(server, base_model):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    completion = client.chat.completions.parse(
        model=base_model,
        messages=[{"role": "user", "content": ASK}],
        response_format=Person,
        max_tokens=60,
        temperature=0,
    )
    person = completion.choices[0].message.parsed  # greedy: sampled, an empty name is a valid Person too
    assert isinstance(person, Person) and "Ada" in person.name


def test_the_sdk_parse_with_a_strict_tool(server, base_model):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    completion = client.chat.completions.parse(
        model=base_model,
        messages=[{"role": "user", "content": ASK}],
        max_tokens=60,
        temperature=0,
        tools=[openai.pydantic_function_tool(Person)],
        tool_choice={"type": "function", "function": {"name": "Person"}},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert isinstance(choice.message.tool_calls[0].function.parsed_arguments, Person)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(server, base_model, method):
    person = chat_model(server, base_model).with_structured_output(Person, method=method).invoke(ASK)
    assert isinstance(person, Person) and person.name


def test_langchain_json_mode_and_streaming(server, base_model):
    """json_mode asks for any JSON object; the schema is the prompt's business, so it is a dict."""
    llm = chat_model(server, base_model)
    found = llm.with_structured_output(method="json_mode").invoke(ASK + " Answer in JSON.")
    assert isinstance(found, dict)
    chunks = list(llm.bind_tools([Person], tool_choice="Person").stream(ASK))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    call = whole.tool_calls[0]
    assert call["name"] == "Person"
    jsonschema.validate(call["args"], Person.model_json_schema())
    assert json.dumps(call["args"])
