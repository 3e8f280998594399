"""Structured outputs and tool calls at the API (no torch): the grammar a chat answer must match
(`response_format`, or `tools` with `tool_choice` `required` / a named function), the messages as
the chat template gets them, and the answer read back as tool calls.

Where the chat template has a tool format (it reads `tools`), the tools and tool turns go through
it and `tool_choice: "auto"` lets the model choose, its calls read in the Hermes convention
(`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, used by Qwen, Hermes and SmolLM3).
A template without one (SmolLM2's) never shows the model its tools: they are told in the system
turn, as TGI does, and only forced calls are possible, under a grammar.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

import llguidance

from mole_serve.api.errors import APIError
from mole_serve.api.protocol import (
    AssistantTurn,
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolMessage,
)

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def json_grammar(schema: dict, lenient: bool = False) -> str:
    """The llguidance grammar of JSON text valid under `schema`: json.dumps' separators and no
    free whitespace (a small model given room for whitespace may spend its whole budget on it).
    `lenient` ignores keywords the compiler does not implement instead of refusing the schema."""
    return llguidance.LLMatcher.grammar_from_json_schema(
        schema,
        defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": lenient},
    )


def has_tool_format(chat_template: str | None) -> bool:
    return chat_template is not None and "tools" in chat_template


@dataclass(frozen=True)
class ToolUse:
    """How a chat answer becomes tool calls: `named` (the text is one function's arguments),
    `required` (a JSON list of calls) or `auto` (Hermes tags in free text)."""

    mode: str
    function: str | None = None

    def calls(self, text: str) -> tuple[list[ToolCall], str | None] | None:
        """(the calls, the remaining content) read from the answer; None when it holds no call
        (free text under `auto`, or an answer cut short by max_tokens)."""
        if self.mode == "named":
            assert self.function is not None  # the named mode carries its function
            return ([_call(self.function, text)], None) if _is_json(text) else None
        if self.mode == "required":
            try:
                found = json.loads(text)
            except json.JSONDecodeError:
                return None
            return [_call(c["name"], json.dumps(c["arguments"])) for c in found], None
        calls = []
        for block in HERMES_CALL.findall(text):
            try:
                found = json.loads(block)
                calls.append(_call(found["name"], json.dumps(found.get("arguments", {}))))
            except (json.JSONDecodeError, KeyError, TypeError):
                return None
        rest = HERMES_CALL.sub("", text).strip()
        return (calls, rest or None) if calls else None


def _call(name: str, arguments: str) -> ToolCall:
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}", type="function", function=FunctionCall(name=name, arguments=arguments)
    )


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def output_constraint(body: ChatCompletionRequest, chat_template: str | None) -> tuple[str | None, ToolUse | None]:
    """(the grammar the answer must match, how it becomes tool calls): a 400 naming the field for
    a schema the grammar compiler refuses, or for a choice this model cannot make."""
    check_tools(body)
    forced = body.forced_tools()
    wants_json = body.response_format is not None and body.response_format.type != "text"
    if forced is not None:
        if wants_json:
            raise APIError(400, "`response_format` cannot be combined with a forced tool call", param="response_format")
        if body.tool_choice != "required":  # a named function: the answer is its arguments
            function = forced[0].function
            grammar = _checked(function.parameters or NO_ARGUMENTS, function.strict, "tools")
            return grammar, ToolUse("named", function.name)
        return _checked(calls_schema(forced, body.parallel_tool_calls), None, "tools"), ToolUse("required")
    if body.tools and body.tool_choice != "none":  # `auto`, the default with tools
        if not has_tool_format(chat_template):
            raise APIError(
                400,
                "tool_choice `auto` needs a chat template with a tool format, and this model's has "
                "none: use tool_choice `required` or name a function",
                param="tool_choice",
            )
        if wants_json:
            raise APIError(400, "`response_format` cannot be combined with tool_choice `auto`", param="response_format")
        return None, ToolUse("auto")
    if body.response_format is None or not wants_json:
        return None, None
    spec = body.response_format.json_schema
    if spec is None:  # json_object
        return _checked({"type": "object"}, None, "response_format"), None
    return _checked(spec.json_schema, spec.strict, "response_format.json_schema.schema"), None


def check_tools(body: ChatCompletionRequest) -> None:
    names = [t.function.name for t in body.tools or []]
    if len(set(names)) < len(names):
        raise APIError(400, "two tools have the same name", param="tools")
    if isinstance(body.tool_choice, NamedToolChoice) and body.tool_choice.function.name not in names:
        raise APIError(
            400,
            f"tool_choice names `{body.tool_choice.function.name}`, which is not among the tools",
            param="tool_choice",
        )
    if body.tool_choice in ("auto", "required") and not names:
        raise APIError(400, f"tool_choice `{body.tool_choice}` needs `tools`", param="tool_choice")


def calls_schema(tools: list[Tool], parallel: bool) -> dict:
    """A JSON list of calls to `tools`: [{"name": ..., "arguments": {...}}], at least one."""
    one_call = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters or NO_ARGUMENTS},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = {"type": "array", "items": {"anyOf": one_call}, "minItems": 1}
    return schema if parallel else {**schema, "maxItems": 1}


def _checked(schema: dict, strict: bool | None, param: str) -> str:
    try:
        grammar = json_grammar(schema, lenient=not strict)
    except ValueError as e:
        raise APIError(400, f"the schema is not a JSON object: {e}", param=param) from e
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise APIError(400, f"the schema cannot constrain the output: {error}", param=param)
    return grammar


def template_messages(body: ChatCompletionRequest, chat_template: str | None) -> tuple[list[dict], list[dict] | None]:
    """(the messages, the tools) as the chat template takes them."""
    native = has_tool_format(chat_template)
    messages = [_template_message(m, native) for m in body.messages]
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and body.tool_choice != "none" else None
    if tools is None or native:
        return messages, tools
    told = "You can call these functions; answer with a JSON call.\n" + "\n".join(
        json.dumps(t["function"]) for t in tools
    )
    if messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + told}, *messages[1:]], None
    return [{"role": "system", "content": told}, *messages], None


def _template_message(m: ChatMessage, native: bool) -> dict:
    role = "system" if m.role == "developer" else m.role
    out: dict = {"role": role, "content": m.text()}  # str values, and a list of calls for a native template
    if isinstance(m, AssistantTurn) and m.tool_calls:
        calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in m.tool_calls]
        if native:
            out["tool_calls"] = [{"type": "function", "function": c} for c in calls]
        else:  # the calls as the model would have written them
            out["content"] = (out["content"] + "\n" if out["content"] else "") + json.dumps(calls)
    if isinstance(m, ToolMessage) and native:
        out["tool_call_id"] = m.tool_call_id
    return out


def _arguments(text: str) -> dict | str:
    """Templates expect a call's arguments as a mapping; OpenAI sends them as JSON text."""
    try:
        found = json.loads(text)
    except json.JSONDecodeError:
        return text
    return found if isinstance(found, dict) else text
