"""Structured outputs and tool calls at the API (no torch): the grammar a chat answer must match
(`response_format`, or `tools` under any `tool_choice` but `none`), the messages as the chat
template gets them, the template's refusals as 400s, and the answer read back as tool calls.

Calls are read in the Hermes convention (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`,
used by Qwen2.5, Qwen3, Hermes and SmolLM3), or in the format the template asks for (tool_format):
Llama 3.1+'s bare `{"name": ..., "parameters": ...}` objects, Mistral's
`[TOOL_CALLS] [{"name": ..., "arguments": ...}]`. Where the chat template has a tool format (it
reads `tools`), the tools and tool turns go through it and `tool_choice: "auto"` leaves the model
free. A template without one (SmolLM2's, Gemma's) never shows the model its tools: they are told
in the system turn, as TGI does (at the start of the first user turn where the template refuses a
system turn, as Gemma 2's does), earlier calls are written into the assistant turns in that
convention, `auto` is a grammar that takes either free text or calls (auto_grammar), and `none` one
of text without a call (the history shows the model calls it could copy). Forced calls are
grammars on both kinds.

Every argument grammar closes the objects its schema lists properties for and leaves open
(`additionalProperties: false`, as vLLM's xgrammar path reads such schemas): a model given room
for keys the function does not take writes some, and may never stop.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llguidance
from jinja2 import TemplateError, TemplateSyntaxError
from transformers.utils.chat_template_utils import render_jinja_template

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

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # (in the stubs only)

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
HERMES, LLAMA3_JSON, MISTRAL = "hermes", "llama3_json", "mistral"  # how a model writes its calls (tool_format)
LLAMA3_CALL = '"parameters": '  # Llama 3.1+'s templates ask for calls so, and write earlier calls so
MISTRAL_TOOLS, MISTRAL_CALLS = "[AVAILABLE_TOOLS]", "[TOOL_CALLS]"  # Mistral's templates: the tools, the calls
MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")  # a call id as Mistral's templates take it
HERMES_CALL = re.compile(rf"{CALL_OPEN}\s*(.*?)\s*{CALL_CLOSE}", re.DOTALL)
WORDS = f"TEXT: /(?s:.*)/ & ~/(?s:.*){CALL_OPEN}(?s:.*)/"  # (Lark) any text without the call marker
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def _json_options(lenient: bool) -> JsonCompileOptions:
    """How llguidance writes JSON: json.dumps' separators and no free whitespace (a small model
    given room for whitespace may spend its whole budget on it). `lenient` ignores keywords the
    compiler does not implement instead of refusing the schema."""
    return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": lenient}


def json_grammar(schema: dict, lenient: bool = False) -> str:
    """The llguidance grammar of JSON text valid under `schema`."""
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_json_options(lenient))


# keywords whose values are subschemas (a map of them, or one or a list); `allOf` and `not` stay as
# they are: closing each part of an intersection, or a negated schema, changes what it means
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMAS = ("items", "prefixItems", "additionalProperties", "anyOf", "oneOf")


def closed(schema: dict) -> dict:
    """`schema` with `additionalProperties: false` on every object schema that lists `properties`
    and says nothing of other keys, nested ones included. An object schema with no `properties`
    (`{"type": "object"}`) is a free-form mapping and stays open."""
    out = {
        k: {name: _closed(s) for name, s in v.items()} if k in _SCHEMA_MAPS and isinstance(v, dict) else v
        for k, v in schema.items()
    }
    out |= {k: _closed(schema[k]) for k in _SCHEMAS if k in schema}
    if "properties" in out and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


def _closed(value: object) -> object:
    if isinstance(value, list):
        return [_closed(v) for v in value]
    return closed(value) if isinstance(value, dict) else value  # (a boolean schema stays)


def arguments_schema(tool: Tool) -> dict:
    """The schema a call's arguments are written under: the function's parameters, closed."""
    parameters = tool.function.parameters
    return closed(parameters) if parameters is not None else NO_ARGUMENTS


def has_tool_format(chat_template: str | None) -> bool:
    return chat_template is not None and "tools" in chat_template


def tool_format(chat_template: str | None) -> str:
    """How the model of a template with a tool format writes a call: LLAMA3_JSON for Llama 3.1+'s
    template (the whole answer is `{"name": ..., "parameters": {...}}`, several joined by `;`),
    MISTRAL for Mistral's (`[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`), else HERMES
    (the tags; also what a template without a tool format is constrained to)."""
    if chat_template is None or not has_tool_format(chat_template) or CALL_OPEN in chat_template:
        return HERMES
    if MISTRAL_TOOLS in chat_template:
        return MISTRAL
    return LLAMA3_JSON if LLAMA3_CALL in chat_template else HERMES


@dataclass(frozen=True)
class ToolUse:
    """How a chat answer becomes tool calls: `named` (the text is one function's arguments),
    `required` (a JSON list of calls) or `auto` (free text or calls, written as `format` says)."""

    mode: str
    function: str | None = None
    format: str = HERMES

    @property
    def marker(self) -> str:
        """What opens the calls in an answer under `auto`."""
        return MISTRAL_CALLS if self.format == MISTRAL else CALL_OPEN

    def answer(self, text: str, finish_reason: str | None) -> tuple[str | None, list[ToolCall] | None, str | None]:
        """(content, tool calls, finish reason) of a finished answer. One cut by max_tokens keeps
        no half call: under `auto` the text before it is the content, else there is none."""
        if finish_reason == "length":
            if self.mode != "auto":
                return None, None, finish_reason
            before, cut, _ = text.partition(self.marker)
            return (before.rstrip() or None) if cut else text, None, finish_reason
        found = self.calls(text) if finish_reason == "stop" else None
        if found is None:
            return text, None, finish_reason
        return found[1], found[0], "tool_calls"

    def calls(self, text: str) -> tuple[list[ToolCall], str | None] | None:
        """(the calls, the remaining content) read from the answer; None when it holds no call
        (free text under `auto`, or a `stop` string that cut the JSON short)."""
        if self.mode == "named":
            assert self.function is not None  # the named mode carries its function
            return ([_call(self.function, text)], None) if _is_json(text) else None
        if self.mode == "required":
            try:
                found = json.loads(text)
            except json.JSONDecodeError:
                return None
            return [_call(c["name"], json.dumps(c["arguments"])) for c in found], None
        if self.format == LLAMA3_JSON:
            found_calls = _llama3_calls(text)
            return (found_calls, None) if found_calls else None
        if self.format == MISTRAL:
            return _mistral_calls(text)
        calls = []
        for block in HERMES_CALL.findall(text):
            try:
                calls.append(_written_call(json.loads(block), "arguments"))
            except (ValueError, KeyError, TypeError):
                return None
        rest = HERMES_CALL.sub("", text).strip()
        return (calls, rest or None) if calls else None


def _written_call(found: object, arguments_key: str) -> ToolCall:
    """A call the model wrote as a JSON object, its name and arguments under `arguments_key` (or
    `arguments`); arguments written as JSON text (some fine-tunes do) are kept as they are.
    Raises TypeError, KeyError or ValueError for anything else."""
    if not isinstance(found, dict) or not isinstance(found["name"], str):
        raise TypeError("a call is an object with a name")
    arguments = found.get(arguments_key, found.get("arguments", {}))
    if isinstance(arguments, str):
        text, arguments = arguments, json.loads(arguments)
    else:
        text = json.dumps(arguments)
    if not isinstance(arguments, dict):
        raise TypeError("a call's arguments are an object")
    return _call(found["name"], text)


def _llama3_calls(text: str) -> list[ToolCall] | None:
    """Llama 3.1+'s calls: an answer that is only JSON objects `{"name": ..., "parameters": {...}}`,
    joined by `;`. None for any other answer (text, or a call cut short)."""
    decoder, calls, text, at = json.JSONDecoder(), [], text.strip(), 0
    while at < len(text):
        try:
            found, at = decoder.raw_decode(text, at)
            calls.append(_written_call(found, "parameters"))
        except (ValueError, KeyError, TypeError):
            return None
        at = len(text) - len(text[at:].lstrip().removeprefix(";").lstrip())
    return calls or None


def _mistral_calls(text: str) -> tuple[list[ToolCall], str | None] | None:
    """Mistral's calls: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` closing the answer,
    the text before the marker its content. The marker is a special token, which the detokenizer
    leaves out of the text: an answer that is only the list reads the same. None for any other
    answer (text, or a list cut short)."""
    before, marked, written = text.partition(MISTRAL_CALLS)
    if not marked:
        before, written = "", text
    try:
        found = json.loads(written)
        if not isinstance(found, list) or not found:
            return None
        return [_written_call(c, "arguments") for c in found], before.strip() or None
    except (ValueError, KeyError, TypeError):
        return None


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
    a schema the grammar compiler refuses, or for fields that ask for two kinds of answer."""
    check_tools(body)
    forced = body.forced_tools()
    wants_json = body.response_format is not None and body.response_format.type != "text"
    if forced is not None:
        if wants_json:
            raise APIError(400, "`response_format` cannot be combined with a forced tool call", param="response_format")
        if body.tool_choice != "required":  # a named function: the answer is its arguments
            grammar = _checked(arguments_schema(forced[0]), forced[0].function.strict, "tools")
            return grammar, ToolUse("named", forced[0].function.name)
        return _checked(calls_schema(forced, body.parallel_tool_calls), None, "tools"), ToolUse("required")
    if body.tools and body.tool_choice != "none":  # `auto`, the default with tools
        if wants_json:
            raise APIError(400, "`response_format` cannot be combined with tool_choice `auto`", param="response_format")
        if has_tool_format(chat_template):  # the model's own format: it was trained to choose
            return None, ToolUse("auto", format=tool_format(chat_template))
        return auto_grammar(body.tools, body.parallel_tool_calls), ToolUse("auto")
    if body.tools and not wants_json and not has_tool_format(chat_template):  # tool_choice `none`
        return words_grammar(), None
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


def max_calls(tools: list[Tool], parallel: bool) -> int:
    """The most calls one answer may hold: one per tool. A small model that has written a call
    tends to write it again, and again, until max_tokens cuts the answer and every call is lost;
    a bound in the grammar ends the answer for sure. One per tool, rather than a bound on equal
    calls (a model repeats with a changed argument too), keeps every function callable in one
    turn; a function wanted twice is called again in the next turn, as agent loops do."""
    return len(tools) if parallel else 1


def one_call(tools: list[Tool]) -> dict:
    """{"name": ..., "arguments": {...}}: a call to one of `tools`."""
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": arguments_schema(t)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
    }


def calls_schema(tools: list[Tool], parallel: bool) -> dict:
    """A JSON list of calls to `tools`: [{"name": ..., "arguments": {...}}], at least one."""
    return {"type": "array", "items": one_call(tools), "minItems": 1, "maxItems": max_calls(tools, parallel)}


def auto_grammar(tools: list[Tool], parallel: bool) -> str:
    """Free text or calls, the model's choice: text that never holds `<tool_call>`, or any text
    (the content) up to the first `<tool_call>` and then only calls, each a JSON call of one
    of `tools` closed by `</tool_call>`, back to back, up to max_calls. The grammar reads bytes,
    so however the tokenizer splits the marker (SmolLM2's: `<` `tool` `_` `call` `>`, or `Ġ<`
    after a space), the text is free until the marker is whole and a call from there on: an
    answer is always text or calls that parse, and no call is ever left in the text."""
    call = json.dumps({**one_call(tools), "x-guidance": _json_options(lenient=True)})
    more = f' ("{CALL_OPEN}" call){{0,{max_calls(tools, parallel) - 1}}}' if max_calls(tools, parallel) > 1 else ""
    lark = f"""%llguidance {{}}
start: TEXT | lead call{more}
lead[lazy]: /(?s:.*){CALL_OPEN}/
call: %json {call} "{CALL_CLOSE}"
{WORDS}
"""
    return _valid(lambda: llguidance.LLMatcher.grammar_from_lark(lark), "tools")


def words_grammar() -> str:
    """Text that holds no call, for tool_choice `none`."""
    return llguidance.LLMatcher.grammar_from_lark(f"start: TEXT\n{WORDS}\n")


def _checked(schema: dict, strict: bool | None, param: str) -> str:
    return _valid(lambda: json_grammar(schema, lenient=not strict), param)


def _valid(build: Callable[[], str], param: str) -> str:
    """The grammar `build` writes; a 400 naming `param` for a schema it cannot take."""
    try:
        grammar = build()
    except ValueError as e:
        raise APIError(400, f"the schema is not a JSON object: {e}", param=param) from e
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise APIError(400, f"the schema cannot constrain the output: {error}", param=param)
    return grammar


@contextmanager
def template_refusals() -> Iterator[None]:
    """Around applying the chat template: a conversation the template refuses (its
    `raise_exception`, as Gemma's on a system turn or on roles that do not alternate, or a field it
    needs that the messages lack) is a 400 quoting the template. A template that does not compile
    is the server's fault and stays a 500."""
    try:
        yield
    except TemplateSyntaxError:
        raise
    except TemplateError as e:
        raise APIError(
            400, f"The base model's chat template refused the conversation: {e.message or repr(e)}", param="messages"
        ) from e


@functools.lru_cache(maxsize=16)
def refuses_system(chat_template: str | None) -> bool:
    """Whether the template refuses a system turn (Gemma 2's raises on one) that it would render
    the chat without; a template the probe cannot render either way is taken to accept one."""
    if chat_template is None:
        return False
    user = {"role": "user", "content": "?"}
    try:
        render_jinja_template([[user]], chat_template=chat_template, add_generation_prompt=True)
    except (TemplateError, TypeError, ValueError):
        return False
    try:
        render_jinja_template(
            [[{"role": "system", "content": "?"}, user]], chat_template=chat_template, add_generation_prompt=True
        )
    except (TemplateError, TypeError, ValueError):
        return True
    return False


def template_messages(body: ChatCompletionRequest, chat_template: str | None) -> tuple[list[dict], list[dict] | None]:
    """(the messages, the tools) as the chat template takes them."""
    native = has_tool_format(chat_template)
    messages = [_template_message(m, native, tool_format(chat_template)) for m in body.messages]
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and body.tool_choice != "none" else None
    if tools is None or native:
        return messages, tools
    told = (
        "You can call these functions:\n"
        + "\n".join(json.dumps(t["function"]) for t in tools)
        + f'\nTo call one, answer with {CALL_OPEN}{{"name": <its name>, "arguments": <its arguments>}}{CALL_CLOSE}. '
        "Otherwise answer in words."
    )
    if messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + told}, *messages[1:]], None
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first is not None and refuses_system(chat_template):  # as Gemma 3's template places a system turn
        opened = {**messages[first], "content": told + "\n\n" + messages[first]["content"]}
        return [*messages[:first], opened, *messages[first + 1 :]], None
    return [{"role": "system", "content": told}, *messages], None


def _template_message(m: ChatMessage, native: bool, format: str) -> dict:
    role = "system" if m.role == "developer" else m.role
    out: dict = {"role": role, "content": m.text()}  # str values, and a list of calls for a native template
    if isinstance(m, AssistantTurn) and m.tool_calls:
        calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in m.tool_calls]
        if native:
            out["tool_calls"] = [
                {"id": _template_id(c.id, format), "type": "function", "function": f}
                for c, f in zip(m.tool_calls, calls)
            ]
        else:  # the calls as the model is told to write them
            written = "".join(f"{CALL_OPEN}{json.dumps(c)}{CALL_CLOSE}" for c in calls)
            out["content"] = (out["content"] + "\n" if out["content"] else "") + written
    if isinstance(m, ToolMessage) and native:
        out["tool_call_id"] = _template_id(m.tool_call_id, format)
    return out


def _template_id(call_id: str, format: str) -> str:
    """A call's id as the template takes it. Mistral's refuses any but nine letters or digits:
    another id becomes nine hex digits of its hash, the same for the call and for the `tool`
    result that names it."""
    if format != MISTRAL or MISTRAL_ID.fullmatch(call_id):
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def _arguments(text: str) -> dict | str:
    """Templates expect a call's arguments as a mapping; OpenAI sends them as JSON text."""
    try:
        found = json.loads(text)
    except json.JSONDecodeError:
        return text
    return found if isinstance(found, dict) else text
