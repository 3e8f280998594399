"""Agent loops against the real server (SmolLM2, whose chat template has no tool format), through
clients nobody here wrote, each as it ships: a pydantic-ai Agent with a tool, LangChain's
`bind_tools` with a `ToolMessage` round trip, and litellm with `tools`. None sends `tool_choice`
(`auto`): the model calls the tool, the loop sends its result back with the tools still
attached, and the model answers in words.

The conversation opens with two earlier weather questions answered through the tool, as an
agent's session holds them: a 135M model then calls the tool for the next one (greedy), where a
first question alone gets a made-up answer in words."""

import json
import os

import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic_ai import Agent
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from tests.e2e.conftest import API_KEY

pytestmark = pytest.mark.e2e
QUESTION = "What is the weather in {}?"
EARLIER = [  # (city, what the tool said, the answer)
    ("Oslo", "Snowy, -3 degrees Celsius", "It is snowy in Oslo, -3 degrees Celsius."),
    ("Rome", "Rainy, 12 degrees Celsius", "It is rainy in Rome, 12 degrees Celsius."),
]
ASK = QUESTION.format("Paris")
SUNNY = "Sunny, 24 degrees Celsius"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ARGUMENTS = WEATHER["function"]["parameters"]


@pytest.fixture(scope="module")
def base_model(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY).models.list().data[0].id


def assert_answer(text: object) -> None:
    assert isinstance(text, str) and text.strip() and "<tool_call>" not in text


def test_pydantic_ai_agent_with_a_tool(server, base_model):
    agent = Agent(OpenAIChatModel(base_model, provider=OpenAIProvider(base_url=f"{server}/v1", api_key=API_KEY)))
    called: list[str] = []

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        called.append(city)
        return SUNNY

    history: list[ModelMessage] = []
    for i, (city, said, answer) in enumerate(EARLIER):
        history += [
            ModelRequest(parts=[UserPromptPart(QUESTION.format(city))]),
            ModelResponse(parts=[ToolCallPart("get_weather", {"city": city}, tool_call_id=f"call_{i}")]),
            ModelRequest(parts=[ToolReturnPart("get_weather", said, tool_call_id=f"call_{i}")]),
            ModelResponse(parts=[TextPart(answer)]),
        ]
    result = agent.run_sync(ASK, message_history=history, model_settings={"temperature": 0})
    assert len(called) == 1 and called[0].strip()
    parts = [p for m in result.new_messages() for p in m.parts]
    assert [type(p) for p in parts] == [UserPromptPart, ToolCallPart, ToolReturnPart, TextPart]
    assert parts[2].content == SUNNY
    assert_answer(result.output)


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return SUNNY


def test_langchain_bind_tools_and_a_tool_message(server, base_model):
    llm = ChatOpenAI(base_url=f"{server}/v1", api_key=API_KEY, model=base_model, temperature=0)
    chat = llm.bind_tools([get_weather])
    messages: list[BaseMessage] = []
    for i, (city, said, answer) in enumerate(EARLIER):
        messages += [
            HumanMessage(QUESTION.format(city)),
            AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": city}, "id": f"call_{i}"}]),
            ToolMessage(said, tool_call_id=f"call_{i}"),
            AIMessage(answer),
        ]
    messages.append(HumanMessage(ASK))
    chunks = list(chat.stream(messages))  # the first turn streamed: the calls come whole in the last chunk
    asked = chunks[0]
    for chunk in chunks[1:]:
        asked += chunk
    assert asked.tool_calls and all(c["name"] == "get_weather" for c in asked.tool_calls)
    for call in asked.tool_calls:
        jsonschema.validate(call["args"], get_weather.tool_call_schema.model_json_schema())
    messages += [asked, *(ToolMessage(get_weather.invoke(c["args"]), tool_call_id=c["id"]) for c in asked.tool_calls)]
    answered = chat.invoke(messages)
    assert not answered.tool_calls
    assert_answer(answered.content)


def test_litellm_with_tools(server, base_model):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # read at import: no cost map fetched
    import litellm

    messages: list[dict] = []
    for i, (city, said, answer) in enumerate(EARLIER):
        call = {"name": "get_weather", "arguments": json.dumps({"city": city})}
        messages += [
            {"role": "user", "content": QUESTION.format(city)},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": f"call_{i}", "type": "function", "function": call}],
            },
            {"role": "tool", "tool_call_id": f"call_{i}", "content": said},
            {"role": "assistant", "content": answer},
        ]
    messages.append({"role": "user", "content": ASK})

    def complete():
        return litellm.completion(
            model=f"openai/{base_model}",
            api_base=f"{server}/v1",
            api_key=API_KEY,
            messages=messages,
            tools=[WEATHER],
            temperature=0,
        ).choices[0]

    asked = complete()
    assert asked.finish_reason == "tool_calls" and asked.message.tool_calls
    for call in asked.message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), ARGUMENTS)
    messages.append(asked.message.model_dump(exclude_none=True))
    messages += [{"role": "tool", "tool_call_id": c.id, "content": SUNNY} for c in asked.message.tool_calls]
    answered = complete()
    assert answered.finish_reason == "stop" and not answered.message.tool_calls
    assert_answer(answered.message.content)
