"""What a base model of another family changes at the API: its chat template's own tool format
(Qwen2.5's Hermes tags, Llama 3.1+'s bare JSON calls, Mistral's `[TOOL_CALLS]` list) rendered and
read back into OpenAI tool_calls; a template without a system role (Gemma 2's) told the tools in
the first user turn, and its refusals answered as 400s; and a trained gate of another base: left
out at start-up, said in the log and on `auto`'s card in /v1/models, with `auto` mixing what it
retrieves."""

from __future__ import annotations

import copy
import json
import logging
import re
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from mole_serve.api.app import create_app
from mole_serve.api.openai_routes import chat_shape
from mole_serve.api.protocol import ChatCompletionRequest
from mole_serve.api.structured import (
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    ToolUse,
    output_constraint,
    refuses_system,
    template_messages,
    tool_format,
)
from mole_serve.compose import build, gate_base
from mole_serve.config import Settings
from mole_serve.engine.model import DecoderModel
from mole_serve.library.artifacts import GateFormatError, save_gate
from mole_serve.library.store import GATE_CONFIG, GATE_DIR
from mole_serve.lora.gate import GateConfig, MoLEGate
from mole_serve.routing.retriever import Retriever

from tests.unit.helpers import carded_adapters
from tests.unit.test_admin_api import HashEmbedder
from tests.unit.test_structured import WEATHER
from tests.unit.test_tool_calls import ASK, HERMES_TEMPLATE, serving, tiny_engine

# Qwen2.5-Instruct's chat template (tokenizer_config.json), tools and tool turns included
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501

# Llama 3.2-Instruct's chat template, its tool parts (the system turn's date lines left out)
LLAMA32_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools is not none %}
    {%- set first_user_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501

# Mistral-7B-Instruct-v0.3's chat template (tokenizer_config.json): the tools in [AVAILABLE_TOOLS]
# before the last user turn, earlier calls after [TOOL_CALLS], results in [TOOL_RESULTS]; call ids of
# nine characters
MISTRAL_V03_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501

# Gemma 2's chat template (google/gemma-2-2b-it's tokenizer_config.json; Gemma 1's is the same): no
# system role, user and model turns that alternate
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# Gemma 3's (google/gemma-3-1b-it's): a system turn becomes the start of the first user turn
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

CALLED = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"unit": "c", "days": 1}'}}
    ],
}
FOLLOW_UP = [
    {"role": "user", "content": "What is the weather like?"},
    CALLED,
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]


def request(messages: list[dict]) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "auto", "messages": messages, "tools": [WEATHER]})


def rendered(tokenizer, template: str, body: ChatCompletionRequest) -> str:
    """The prompt as the chat route builds it (openai_routes.start_chat), as text."""
    messages, tools = template_messages(body, template)
    return tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, add_generation_prompt=True, tokenize=False
    )


def finished(text: str, finish_reason: str = "stop") -> SimpleNamespace:
    """A finished Generation as chat_shape reads it."""
    return SimpleNamespace(text=text, finish_reason=finish_reason, logprobs=[], take_logprobs=lambda: [])


def calls_of(tool_use: ToolUse, text: str) -> tuple[str | None, list[tuple[str, dict]], str | None]:
    content, calls, finish = tool_use.answer(text, "stop")
    return content, [(c.function.name, json.loads(c.function.arguments)) for c in calls or []], finish


def test_qwen25s_template_renders_the_tools_and_turns_its_own_way(tokenizer):
    body = request(FOLLOW_UP)
    assert tool_format(QWEN25_TEMPLATE) == HERMES
    assert output_constraint(body, QWEN25_TEMPLATE) == (None, ToolUse("auto", format=HERMES))  # free, no grammar
    prompt = rendered(tokenizer, QWEN25_TEMPLATE, body)
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "c", "days": 1}}\n</tool_call>' in prompt
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_qwens_hermes_calls_become_openai_tool_calls(tokenizer):
    _, tool_use = output_constraint(request(FOLLOW_UP[:1]), QWEN25_TEMPLATE)
    assert tool_use is not None
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "f", "days": 3}}\n</tool_call>'
    assert calls_of(tool_use, one) == (None, [("get_weather", {"unit": "f", "days": 3})], "tool_calls")
    two = f"Let me look.\n{one}\n" + one.replace('"days": 3', '"days": 4')
    assert calls_of(tool_use, two) == (
        "Let me look.",
        [("get_weather", {"unit": "f", "days": 3}), ("get_weather", {"unit": "f", "days": 4})],
        "tool_calls",
    )
    as_text = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"unit\\": \\"c\\"}"}\n</tool_call>'
    assert calls_of(tool_use, as_text) == (None, [("get_weather", {"unit": "c"})], "tool_calls")
    for not_a_call in (
        "It is sunny.",
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>["get_weather"]</tool_call>',
    ):
        assert calls_of(tool_use, not_a_call) == (not_a_call, [], "stop")

    shape = chat_shape(tokenizer, False, tool_use)
    message = shape.choice(0, finished(one)).model_dump(exclude_none=True)
    assert message["finish_reason"] == "tool_calls" and "content" not in message["message"]
    (call,) = message["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"unit": "f", "days": 3}'}
    # a stream holds the text back and sends the calls, indexed, in its last chunk
    assert shape.delta(0, "<tool_call>", None, finished(one)) is None
    last = shape.delta(0, "", "stop", finished(one)).model_dump(exclude_none=True)
    assert last["finish_reason"] == "tool_calls" and last["delta"]["tool_calls"][0]["index"] == 0


def test_llama3s_template_and_json_calls(tokenizer):
    body = request(FOLLOW_UP)
    assert tool_format(LLAMA32_TEMPLATE) == LLAMA3_JSON
    assert tool_format(HERMES_TEMPLATE) == HERMES and tool_format(None) == HERMES
    grammar, tool_use = output_constraint(body, LLAMA32_TEMPLATE)
    assert grammar is None and tool_use == ToolUse("auto", format=LLAMA3_JSON)
    prompt = rendered(tokenizer, LLAMA32_TEMPLATE, body)
    assert '"name": "get_weather"' in prompt and "What is the weather like?" in prompt
    assert '{"name": "get_weather", "parameters": {"unit": "c", "days": 1}}<|eot_id|>' in prompt
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"sunny"<|eot_id|>' in prompt  # (a string is iterable)

    call = '{"name": "get_weather", "parameters": {"unit": "c", "days": 2}}'
    assert calls_of(tool_use, call) == (None, [("get_weather", {"unit": "c", "days": 2})], "tool_calls")
    assert calls_of(tool_use, f" {call}; {call.replace('2', '5')}\n")[1] == [
        ("get_weather", {"unit": "c", "days": 2}),
        ("get_weather", {"unit": "c", "days": 5}),
    ]
    for not_a_call in ("It is sunny.", call[:-3], f"{call} and then?", '{"unit": "c"}'):
        assert calls_of(tool_use, not_a_call) == (not_a_call, [], "stop")


def test_mistrals_template_and_its_tool_calls(tokenizer):
    """Mistral v0.3's template renders the tools, the calls and their results (any call id, mapped to
    the nine characters it wants, the same in the call and its result); its calls are read from
    the list after `[TOOL_CALLS]`, with the marker or without it (the detokenizer drops special
    tokens), whole and streamed."""
    body = request(FOLLOW_UP)
    assert tool_format(MISTRAL_V03_TEMPLATE) == MISTRAL
    assert output_constraint(body, MISTRAL_V03_TEMPLATE) == (None, ToolUse("auto", format=MISTRAL))
    prompt = rendered(tokenizer, MISTRAL_V03_TEMPLATE, body)
    parameters = json.dumps(WEATHER["function"]["parameters"])
    listed = (
        f'[AVAILABLE_TOOLS] [{{"type": "function", "function": {{"name": "get_weather", "parameters": {parameters}}}}}]'
    )
    assert f"{listed}[/AVAILABLE_TOOLS][INST] What is the weather like?[/INST]" in prompt
    written = re.search(
        r'\[TOOL_CALLS\] \[\{"name": "get_weather", "arguments": \{"unit": "c", "days": 1\}, "id": "(\w+)"\}\]', prompt
    )
    assert written is not None and re.fullmatch(r"[A-Za-z0-9]{9}", call_id := written.group(1))
    assert f'[TOOL_RESULTS] {{"content": sunny, "call_id": "{call_id}"}}[/TOOL_RESULTS]' in prompt
    nine = [{**FOLLOW_UP[1], "tool_calls": [{**CALLED["tool_calls"][0], "id": "A1b2C3d4E"}]}]
    assert '"id": "A1b2C3d4E"}]' in rendered(tokenizer, MISTRAL_V03_TEMPLATE, request([*FOLLOW_UP[:1], *nine]))

    _, tool_use = output_constraint(request(FOLLOW_UP[:1]), MISTRAL_V03_TEMPLATE)
    assert tool_use is not None
    one = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"unit": "f", "days": 3}}]'
    assert calls_of(tool_use, one) == (None, [("get_weather", {"unit": "f", "days": 3})], "tool_calls")
    assert calls_of(tool_use, one.removeprefix("[TOOL_CALLS]")) == calls_of(tool_use, one)
    two = 'Let me look. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"unit": "f", "days": 3}}, ' + (
        '{"name": "get_weather", "arguments": "{\\"unit\\": \\"c\\", \\"days\\": 4}", "id": "A1b2C3d4E"}]\n'
    )
    assert calls_of(tool_use, two) == (
        "Let me look.",
        [("get_weather", {"unit": "f", "days": 3}), ("get_weather", {"unit": "c", "days": 4})],
        "tool_calls",
    )
    for not_a_call in (
        "It is sunny.",
        one[:-3],
        f"{one} and then?",
        "[TOOL_CALLS] []",
        '[TOOL_CALLS] {"name": "get_weather", "arguments": {}}',
        "[1, 2]",
    ):
        assert calls_of(tool_use, not_a_call) == (not_a_call, [], "stop")
    assert tool_use.answer(f"Let me see. {one[:30]}", "length") == ("Let me see.", None, "length")

    shape = chat_shape(tokenizer, False, tool_use)
    message = shape.choice(0, finished(one)).model_dump(exclude_none=True)
    assert message["finish_reason"] == "tool_calls" and "content" not in message["message"]
    assert message["message"]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"unit": "f", "days": 3}',
    }
    assert shape.delta(0, "[{", None, finished(one)) is None
    last = shape.delta(0, "", "stop", finished(two)).model_dump(exclude_none=True)
    assert last["finish_reason"] == "tool_calls" and last["delta"]["content"] == "Let me look."
    assert [c["index"] for c in last["delta"]["tool_calls"]] == [0, 1]


def test_gemma_templates_take_the_tools_at_the_start_of_the_first_user_turn(tokenizer):
    """Without a tool format the tools are told in a system turn; Gemma 2's template refuses one, so
    there they open the first user turn, where Gemma 3's template puts a system turn itself: the
    two prompts are the same, and `auto` is the grammar of text or calls."""
    body = request(ASK)
    assert refuses_system(GEMMA2_TEMPLATE)
    assert not any(map(refuses_system, (GEMMA3_TEMPLATE, QWEN25_TEMPLATE, tokenizer.chat_template, None)))
    grammar, tool_use = output_constraint(body, GEMMA2_TEMPLATE)
    assert grammar is not None and tool_use == ToolUse("auto")
    messages, tools = template_messages(body, GEMMA2_TEMPLATE)
    assert tools is None and [m["role"] for m in messages] == ["user"]
    assert [m["role"] for m in template_messages(body, GEMMA3_TEMPLATE)[0]] == ["system", "user"]
    prompt = rendered(tokenizer, GEMMA2_TEMPLATE, body)
    assert prompt == rendered(tokenizer, GEMMA3_TEMPLATE, body)
    told = f"<start_of_turn>user\nYou can call these functions:\n{json.dumps(WEATHER['function'])}\nTo call one,"
    assert told in prompt
    assert prompt.endswith(
        "Otherwise answer in words.\n\nWhat is the weather like?<end_of_turn>\n<start_of_turn>model\n"
    )
    # an earlier call, written into the model's turn, keeps the turns alternating
    later = rendered(tokenizer, GEMMA2_TEMPLATE, request([*ASK, {**CALLED, "content": "Let me look."}, *ASK]))
    assert later.count("You can call these functions") == 1 and '<tool_call>{"name": "get_weather"' in later


def test_a_template_refusal_is_a_400_quoting_it_and_the_server_serves_on(tokenizer):
    """Gemma 2's template raises on a system turn and on a `tool` turn: each route that renders
    the chat answers a 400 in OpenAI's shape quoting it, and the next request is served."""
    gemma = copy.deepcopy(tokenizer)
    gemma.chat_template = GEMMA2_TEMPLATE
    system = [{"role": "system", "content": "Be brief."}, *ASK]
    refused = "The base model's chat template refused the conversation: "
    with serving(tiny_engine(gemma)) as client:
        for body in (
            {"messages": system},
            {"messages": system, "stream": True},
            {"messages": system, "tools": [WEATHER]},
        ):
            r = client.post("/v1/chat/completions", json={**body, "max_tokens": 4})
            assert r.status_code == 400, r.text
            assert r.json() == {
                "error": {
                    "message": refused + "System role not supported",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": None,
                }
            }
        r = client.post("/v1/chat/completions", json={"messages": FOLLOW_UP, "tools": [WEATHER], "max_tokens": 4})
        assert r.status_code == 400
        assert (
            r.json()["error"]["message"]
            == refused + "Conversation roles must alternate user/assistant/user/assistant/..."
        )
        r = client.post("/v1/responses", json={"input": "Hi", "instructions": "Be brief.", "max_output_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        r = client.post("/tokenize", json={"messages": system})
        assert r.status_code == 400 and r.json()["error"]["message"] == refused + "System role not supported"

        for body in ({"messages": ASK}, {"messages": ASK, "tools": [WEATHER]}):
            r = client.post("/v1/chat/completions", json={**body, "max_tokens": 4})
            assert r.status_code == 200, r.text
        assert client.post("/tokenize", json={"messages": ASK}).json()["tokens"]


@pytest.fixture
def store(tmp_path):
    """Two adapters of the tiny model with cards, and a gate trained for another base model."""
    hf, root = carded_adapters(tmp_path, seed=70)
    save_gate(MoLEGate(GateConfig("another-base", 2, 64, 128)), root / GATE_DIR)
    return hf, root


def built_over(store, tokenizer):
    hf, root = store
    settings = Settings(adapters_dir=root, max_model_len=64, max_num_seqs=4, max_loras=4)
    model = DecoderModel(hf.config, hf.state_dict(), torch.device("cpu"), torch.float32)
    return build(settings, model=model, tokenizer=tokenizer, retriever=Retriever(HashEmbedder()))


def test_a_gate_of_another_base_is_left_out_and_auto_mixes(store, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="mole_serve.compose"):
        built = built_over(store, tokenizer)
    assert built.engine.pool.gate is None
    assert "another-base" in (built.catalog.gate_refused or "")
    (logged,) = [r.getMessage() for r in caplog.records if "another-base" in r.getMessage()]
    assert "not served" in logged and "`mixture`" in logged

    with TestClient(create_app(built.settings, lambda: built)) as client:
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
        auto = cards["auto"]
        assert auto["routing"] == "mixture" and "trained for base model 'another-base'" in auto["routing_note"]
        assert client.get("/v1/models/auto").json() == {
            **auto,
            "created": client.get("/v1/models/auto").json()["created"],
        }
        assert cards["alpha"]["routing"] is None and cards[built.engine.model_name]["routing"] is None
        answer = client.post(
            "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "alpha task"}], "max_tokens": 2},
        ).json()
    report = answer["adapters"]
    assert {a["name"] for a in report} == {"alpha", "beta"} and report[0]["name"] == "alpha"
    assert all("gate_weight" not in a for a in report)  # weighed by retrieval, not by a gate


def test_a_gate_that_fits_routes_auto_and_a_broken_one_stops_the_start(store, tokenizer):
    hf, root = store
    model = DecoderModel(hf.config, hf.state_dict(), torch.device("cpu"), torch.float32)
    save_gate(MoLEGate(GateConfig.for_base(gate_base(model), model.lora_spec())), root / GATE_DIR)
    built = built_over(store, tokenizer)
    assert built.engine.pool.gate is not None and built.catalog.gate_refused is None
    with TestClient(create_app(built.settings, lambda: built)) as client:
        auto = client.get("/v1/models/auto").json()
    assert auto["routing"] == "gate" and auto["routing_note"] is None
    (root / GATE_DIR / GATE_CONFIG).write_text("{not json")
    with pytest.raises(GateFormatError, match="cannot read"):
        built_over(store, tokenizer)
