"""/v1/responses request and response models (OpenAI's Responses API, stateless). The request is
read as a chat request (chat_request): the chat route's template, grammar and generation serve it.
No torch here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    Field,
    RootModel,
    StrictBool,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from mole_serve.api.protocol import (
    NAME_PATTERN,
    ChatCompletionRequest,
    JSONInt,
    JSONObject,
    PositiveJSONInt,
    ResponseFormat,
    SamplingFields,
    Unsupported,
    asks_for_nothing,
    refuse_unsupported,
)

# OpenAI's limits on `metadata`: 16 pairs, keys up to 64 characters, values up to 512
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]

NOT_STORED = "responses are not stored here: send the whole conversation in `input`"
NO_TOOLS = "tools are not supported on /v1/responses: use /v1/chat/completions"
# Responses fields this server does not implement (protocol.Unsupported)
UNSUPPORTED: Unsupported = {
    "store": ((None, False), f"`store` can only be false: {NOT_STORED}"),
    "previous_response_id": ((None,), NOT_STORED),
    "conversation": ((None,), NOT_STORED),
    "background": ((None, False), f"background responses are not supported: {NOT_STORED}"),
    "background_options": ((None,), f"background responses are not supported: {NOT_STORED}"),
    "prompt": ((None,), "stored prompts are not supported: send the text in `instructions` and `input`"),
    "tools": ((None, []), NO_TOOLS),
    "max_tool_calls": ((None,), NO_TOOLS),
    "tool_choice": ((None, "none", "auto"), f"only `none` or `auto`, with no tools to choose ({NO_TOOLS})"),
    "reasoning": ((None,), "reasoning options are not supported: the models served here do not reason"),
    "include": ((None, []), "nothing extra can be included: no logprobs, reasoning or tool outputs are produced"),
    "top_logprobs": ((None,), "logprobs are not supported on /v1/responses: use /v1/chat/completions"),
    "truncation": ((None, "disabled"), "only `disabled`: a prompt over the context window is a 400, never cut"),
    "service_tier": ((None, "auto", "default"), "only `auto` or `default`: there is one service tier"),
    "prompt_cache_key": ((None,), "the prefix cache serves every request as it comes and takes no key"),
    "prompt_cache_retention": ((None,), "the prefix cache keeps blocks while memory allows; no retention is set"),
    "prompt_cache_options": ((None,), "the prefix cache takes no options"),
    "context_management": ((None,), "context management is not supported: a prompt over the window is a 400"),
    "moderation": ((None,), "moderation is not supported"),
    "image": ((None,), "images are not supported: this model reads and writes text only"),
    "access_programs": ((None,), "access programs are not supported"),
}


def _message(error: ErrorDetails) -> str:
    """A pydantic error's message; a validator's own, without pydantic's `Value error, `."""
    return str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]


def _located(field: str, where: Sequence[int | str], error: ErrorDetails) -> ValueError:
    """A nested error as one message that says where it is (the param stays the field)."""
    return ValueError(f"{'.'.join([field, *map(str, where)])}: {_message(error)}" if where else _message(error))


def _union_label(p: int | str) -> bool:
    """pydantic's name for a member of a `str | list[...]` union, in an error's location."""
    return isinstance(p, str) and (p == "str" or p.startswith("list["))


class InputPart(BaseModel):
    """A text part of an input message: `input_text`, or `output_text` of an earlier answer."""

    type: Literal["input_text", "output_text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: object) -> object:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind not in (None, "input_text", "output_text"):
            raise ValueError(f"content part of type {kind!r} is not supported: this model reads text only")
        return data


class InputMessage(BaseModel):
    """One turn; an earlier output message passed back (its `id`, `status`) is an assistant turn."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputPart]

    @model_validator(mode="before")
    @classmethod
    def _messages_only(cls, data: object) -> object:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind not in (None, "message"):
            raise ValueError(
                f"input items of type {kind!r} are not supported: only messages (this server runs no "
                "tools and keeps no state)"
            )
        return data

    def turn(self) -> dict[str, str]:
        """The message as a chat request takes it."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class TextFormatText(BaseModel):
    type: Literal["text"]


class TextFormatJSONObject(BaseModel):
    type: Literal["json_object"]


class TextFormatJSONSchema(BaseModel):
    type: Literal["json_schema"]
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    json_schema: JSONObject = Field(alias="schema")  # `schema` shadows a BaseModel attribute
    strict: StrictBool | None = None


TextFormat = Annotated[TextFormatText | TextFormatJSONObject | TextFormatJSONSchema, Field(discriminator="type")]


class TextConfig(BaseModel):
    format: TextFormat = TextFormatText(type="text")
    verbosity: None = None

    @field_validator("format", mode="wrap")
    @classmethod
    def _error_path(cls, v: object, handler: ValidatorFunctionWrapHandler) -> object:
        # (the union's errors would put the format's type where a field goes: format.json_schema.schema)
        try:
            return handler(v)
        except ValidationError as e:
            error = e.errors()[0]
            raise _located("text.format", error["loc"][1:], error) from None

    @field_validator("verbosity", mode="before")
    @classmethod
    def _no_verbosity(cls, v: object) -> object:
        if v is not None:
            raise ValueError("verbosity is not supported: the answer is as long as the model makes it")
        return v

    def response_format(self) -> ResponseFormat:
        """The format as chat's `response_format` (the same grammar path)."""
        if isinstance(self.format, TextFormatJSONSchema):
            spec = self.format.model_dump(exclude={"type"}, by_alias=True)
            return ResponseFormat.model_validate({"type": "json_schema", "json_schema": spec})
        return ResponseFormat(type=self.format.type)


class ResponsesStreamOptions(BaseModel):
    include_obfuscation: Literal[False] | None = None

    @field_validator("include_obfuscation", mode="before")
    @classmethod
    def _no_obfuscation(cls, v: object) -> object:
        if not asks_for_nothing(v, (None, False)):
            raise ValueError("only false: obfuscation is not supported, the deltas are sent as they are")
        return v


class ResponsesRequest(SamplingFields):
    """POST /v1/responses. The sampling and adapter fields are SamplingFields' (chat's extensions
    included); `max_tokens`, chat's name, works too, and `max_output_tokens` wins over it."""

    input: str | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = None  # a system turn before `input`
    max_output_tokens: PositiveJSONInt | None = None
    text: TextConfig | None = None
    metadata: Metadata | None = None  # echoed back
    safety_identifier: str | None = None  # echoed back, as `user`
    parallel_tool_calls: StrictBool | None = None  # no tools: echoed back
    n: JSONInt = Field(1, ge=1, le=1)  # one output message
    stream_options: ResponsesStreamOptions | None = None  # type: ignore[assignment]  # the Responses API's own
    # --- Responses fields not implemented: only the values that ask for nothing (UNSUPPORTED) ---
    store: Literal[False] | None = None
    previous_response_id: None = None
    conversation: None = None
    background: Literal[False] | None = None
    background_options: None = None
    prompt: None = None
    tools: Annotated[list[JSONObject], Field(max_length=0)] | None = None
    max_tool_calls: None = None
    tool_choice: Literal["none", "auto"] | None = None
    reasoning: None = None
    include: Annotated[list[str], Field(max_length=0)] | None = None
    top_logprobs: None = None
    truncation: Literal["disabled"] | None = None
    service_tier: Literal["auto", "default"] | None = None
    prompt_cache_key: None = None
    prompt_cache_retention: None = None
    prompt_cache_options: None = None
    context_management: None = None
    moderation: None = None
    image: None = None
    access_programs: None = None

    @field_validator(*UNSUPPORTED, mode="before")
    @classmethod
    def _unsupported(cls, v: object, info: ValidationInfo) -> object:
        return refuse_unsupported(UNSUPPORTED, v, info)

    @field_validator("input", "metadata", mode="wrap")
    @classmethod
    def _error_path(cls, v: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> object:
        # the param is the field; the message says where in it (pydantic's location holds the
        # union's member names, `input.list[InputMessage].0.content.str`, or a key, `metadata.<key>.[key]`)
        try:
            return handler(v)
        except ValidationError as e:
            assert info.field_name is not None  # (a field's validator)
            # the list member's error: the string member's only says the input is no string
            errors = e.errors()
            error = next((x for x in errors if "str" not in x["loc"]), errors[-1])
            raise _located(info.field_name, [p for p in error["loc"] if not _union_label(p)], error) from None

    def chat_request(self) -> ChatCompletionRequest:
        """This request as /v1/chat/completions reads it: `instructions` a system turn first, the
        text format a `response_format`, the sampling and adapter fields as they are."""
        messages = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        turns = [m.turn() for m in messages]
        if self.instructions is not None:
            turns.insert(0, {"role": "system", "content": self.instructions})
        shared = self.model_dump(include=set(SamplingFields.model_fields) - {"stream_options"}, exclude_unset=True)
        chat = {**shared, "messages": turns, "max_completion_tokens": self.max_output_tokens}
        if self.text is not None:
            chat["response_format"] = self.text.response_format()
        return ChatCompletionRequest.model_validate(chat)


# --- the response (every field always present, as OpenAI sends it) ---
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict] = Field(default_factory=list)  # none: no citations
    logprobs: list[dict] = Field(default_factory=list)  # none: not supported here


Status = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Status
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0  # not counted per request (the prefix cache's hits are a server metric)
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0  # the models served here do not reason


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    """A response: whole (POST /v1/responses), or its state in a stream's lifecycle events."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Status
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool
    temperature: float
    top_p: float
    tool_choice: Literal["none", "auto"]
    tools: list[dict] = Field(default_factory=list)
    text: TextConfig
    truncation: Literal["disabled"] = "disabled"
    store: Literal[False] = False
    background: Literal[False] = False
    service_tier: Literal["default"] = "default"
    metadata: dict[str, str]
    user: str | None
    safety_identifier: str | None
    usage: ResponseUsage | None
    adapters: list[dict] | None = None  # extension: the adapters that ran, as on chat


# --- the stream's events (`event:` names each; `sequence_number` counts them from 0) ---
class LifecycleEvent(BaseModel):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete"]
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputMessage


class ContentPartEvent(BaseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(BaseModel):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[dict] = Field(default_factory=list)


class TextDoneEvent(BaseModel):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[dict] = Field(default_factory=list)


class ErrorEvent(BaseModel):
    """An error after the stream began (its status was sent): the stream ends with it."""

    type: Literal["error"] = "error"
    sequence_number: int
    code: str | None
    message: str
    param: str | None


StreamEvent = LifecycleEvent | OutputItemEvent | ContentPartEvent | TextDeltaEvent | TextDoneEvent | ErrorEvent


class ResponseStreamEvent(RootModel[Annotated[StreamEvent, Field(discriminator="type")]]):
    """One event of a streamed response (the `data` of an SSE event)."""
