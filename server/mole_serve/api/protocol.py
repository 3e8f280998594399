"""OpenAI request and response models, plus our extension fields. No torch here."""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mole_serve.routing.types import Composition, MergeStrategy

T = TypeVar("T")


def _json_number(v: object) -> object:
    """A JSON number stays one: no `true` for 1 or `"5"` for 5 (pydantic's lax mode takes both), while
    1.0 still counts as the integer 1, as JSON Schema says."""
    if isinstance(v, (bool, str)):
        raise ValueError("must be a JSON number")
    return v


JSONInt = Annotated[int, BeforeValidator(_json_number)]


# JSONInts within limits, for optional fields: the limits must sit inside the Annotated, before the
# validator, or the JSON schema carries pydantic's own `ge`/`le` names instead of `minimum`.
PositiveJSONInt = Annotated[int, Field(ge=1), BeforeValidator(_json_number)]
AdapterTopK = Annotated[int, Field(ge=1, le=16), BeforeValidator(_json_number)]
TopLogprobs = Annotated[int, Field(ge=0, le=20), BeforeValidator(_json_number)]
CompletionLogprobs = Annotated[int, Field(ge=0, le=5), BeforeValidator(_json_number)]

JSONFloat = Annotated[float, BeforeValidator(_json_number)]
NonEmpty = Annotated[T, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0), BeforeValidator(_json_number)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class MessageBase(BaseModel):
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: object) -> object:
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part of type {kind!r} is not supported: this model reads text only")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class SystemMessage(MessageBase):
    role: Literal["system", "developer"]


class UserMessage(MessageBase):
    role: Literal["user"]


class AssistantTurn(MessageBase):
    """An earlier answer in the history: text, tool calls, or both."""

    role: Literal["assistant"]
    content: str | list[TextPart] | None = None  # type: ignore[assignment]  # pydantic field override: may be null
    tool_calls: list[ToolCall] | None = None


class ToolMessage(MessageBase):
    role: Literal["tool"]
    tool_call_id: str  # the call it answers


# One model per role, as OpenAI's schema has them: what a role needs is in the schema itself.
ChatMessage = Annotated[SystemMessage | UserMessage | AssistantTurn | ToolMessage, Field(discriminator="role")]
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


class AdapterChoice(BaseModel):
    name: str
    weight: JSONFloat = Field(1.0, gt=0)


class MergeOptions(BaseModel):
    """Composition `merge`: a static merge of the request's adapters (PEFT's add_weighted_adapter)."""

    strategy: MergeStrategy = "linear"
    density: JSONFloat = Field(1.0, gt=0, le=1)  # kept fraction for ties / dare
    seed: JSONInt = 0  # dare's random drop


NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for schema and function names


class JSONSchemaSpec(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    json_schema: dict = Field(default_factory=dict, alias="schema")  # `schema` shadows a BaseModel attribute
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("`json_schema` is required with type `json_schema`, and only with it")
        return self


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; absent: a function without arguments
    strict: StrictBool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


def _lone_surrogate(value: object) -> bool:
    """Whether a JSON value holds a string with a lone UTF-16 surrogate ("\\ud800"): valid JSON,
    but no Unicode text; the tokenizer and every UTF-8 encoder refuse it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # C speed: a scan per character is far too slow on a body of many MB
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_surrogate(v) for v in value)
    return False


class SamplingFields(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: object) -> object:
        if _lone_surrogate(data):
            raise ValueError("the request holds a lone UTF-16 surrogate (e.g. \\ud800), which is not valid Unicode")
        return data

    model: str = "auto"
    max_tokens: PositiveJSONInt | None = None
    temperature: JSONFloat = Field(1.0, ge=0, le=2)
    top_p: JSONFloat = Field(1.0, gt=0, le=1)
    seed: JSONInt | None = None  # any integer, as OpenAI takes it (the sampler folds it into 64 bits)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # OpenAI's limit: 4
    n: JSONInt = Field(1, ge=1, le=1)  # one choice per request
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # --- extensions (the openai client's extra_body) ---
    adapters: list[AdapterChoice] | None = None  # a name alone stands for {"name": name}
    top_k: AdapterTopK | None = None  # adapters retrieval keeps for `auto` (docs/api.md)
    composition: Composition | None = None
    merge: MergeOptions | None = None
    ignore_eos: StrictBool = False  # as in vLLM: generate max_tokens whatever the model says (benchmarks)

    @field_validator("adapters", mode="before")
    @classmethod
    def _names_are_choices(cls, v: object) -> object:
        return [{"name": a} if isinstance(a, str) else a for a in v] if isinstance(v, list) else v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def adapter_choices(self) -> list[AdapterChoice]:
        return list(self.adapters or [])

    def token_limit(self) -> int | None:
        """The most tokens the completion may have; None: up to the context window."""
        return self.max_tokens

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(alternatives per generated token, per prompt token); None: not asked."""
        return None, None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveJSONInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: TopLogprobs | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def forced_tools(self) -> list[Tool] | None:
        """The tools the answer must call (tool_choice `required` or a named function), else None."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools or [] if t.function.name == self.tool_choice.function.name]
        return list(self.tools or []) if self.tool_choice == "required" else None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None


class CompletionRequest(SamplingFields):
    # text, texts, or token ids (one prompt or many), as OpenAI takes them (lm-eval sends ids)
    prompt: (
        NonEmpty[str]
        | NonEmpty[list[NonEmpty[str]]]
        | NonEmpty[list[TokenId]]
        | NonEmpty[list[NonEmpty[list[TokenId]]]]
    )
    echo: StrictBool = False
    logprobs: CompletionLogprobs | None = None  # 0: the tokens' own logprobs, no alternatives

    def token_limit(self) -> int | None:
        return self.max_tokens or 16  # OpenAI's default for /v1/completions

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


# --- responses (built with exclude_unset: a chunk carries only the fields set on it) ---
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class TextLogprobs(BaseModel):
    """The legacy completions shape; the first prompt token (with `echo`) has no logprob."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage | None = None  # the whole answer
    delta: dict[str, str | list[dict]] | None = None  # a streamed piece: {"role", "content"}, {"content"},
    # {"tool_calls": [...]} or {}
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: TextLogprobs | None = None
    finish_reason: str | None = None


class CompletionEnvelope(BaseModel):
    """chat.completion, chat.completion.chunk and text_completion: one envelope, their choices differ."""

    id: str
    object: Literal["chat.completion", "chat.completion.chunk", "text_completion"]
    created: int
    model: str
    choices: list[ChatChoice] | list[TextChoice]
    usage: Usage | None = None
    adapters: list[dict] | None = None  # extension: the adapters that ran, with scores and gate weights


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer, in OpenAI's shape (api/errors.py builds it; openapi.py documents it)."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mole-serve"
    root: str
    parent: str | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
