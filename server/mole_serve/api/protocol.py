"""OpenAI request and response models, plus our extension fields. No torch here."""

from __future__ import annotations

import math
from typing import Annotated, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
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
# Every float a request carries: a JSON number, and finite. Python's json module reads `NaN`,
# `Infinity` and numbers past the float range (1e999) as NaN or inf, which pass any `gt`/`le` bound
# and poison whatever they reach (an adapter weight of inf turns the logits into NaN).
FiniteFloat = Annotated[float, AllowInfNan(False), BeforeValidator(_json_number)]


def _finite_numbers(value: object) -> bool:
    """Whether every number in a JSON value is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return True


def _finite_json(value: dict) -> dict:
    if not _finite_numbers(value):
        raise ValueError("holds a number that is not finite (NaN, Infinity, or past the float range)")
    return value


JSONObject = Annotated[dict, AfterValidator(_finite_json)]  # a free-form object (a JSON schema), its numbers finite


# JSONInts within limits, for optional fields: the limits must sit inside the Annotated, before the
# validator, or the JSON schema carries pydantic's own `ge`/`le` names instead of `minimum`.
PositiveJSONInt = Annotated[int, Field(ge=1), BeforeValidator(_json_number)]
AdapterTopK = Annotated[int, Field(ge=1, le=16), BeforeValidator(_json_number)]
TopLogprobs = Annotated[int, Field(ge=0, le=20), BeforeValidator(_json_number)]
CompletionLogprobs = Annotated[int, Field(ge=0, le=5), BeforeValidator(_json_number)]
OnlyOne = Annotated[int, Field(ge=1, le=1), BeforeValidator(_json_number)]
NoPenalty = Annotated[float, Field(ge=0, le=0), AllowInfNan(False), BeforeValidator(_json_number)]

NonEmpty = Annotated[T, Field(min_length=1)]
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
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
    weight: FiniteFloat = Field(1.0, gt=0)


class MergeOptions(BaseModel):
    """Composition `merge`: a static merge of the request's adapters (PEFT's add_weighted_adapter)."""

    strategy: MergeStrategy = "linear"
    density: FiniteFloat = Field(1.0, gt=0, le=1)  # kept fraction for ties / dare
    seed: JSONInt = 0  # dare's random drop


NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for schema and function names


class JSONSchemaSpec(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    json_schema: JSONObject = Field(default_factory=dict, alias="schema")  # `schema` shadows a BaseModel attribute
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
    parameters: JSONObject | None = None  # a JSON schema; absent: a function without arguments
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
    temperature: FiniteFloat = Field(1.0, ge=0, le=2)
    top_p: FiniteFloat = Field(1.0, gt=0, le=1)
    seed: JSONInt | None = None  # any integer, as OpenAI takes it (the sampler folds it into 64 bits)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
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
    # --- OpenAI fields this server does not implement: a value that asks for nothing, or a 400 ---
    frequency_penalty: NoPenalty | None = None
    presence_penalty: NoPenalty | None = None
    logit_bias: dict[str, FiniteFloat] | None = Field(None, max_length=0)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_sequences(cls, v: object) -> object:
        # (the union's own error would name its first member: "stop.str: Input should be a valid string")
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError(f"must be a string or a list of up to {MAX_STOP_SEQUENCES} strings")
        if len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"up to {MAX_STOP_SEQUENCES} stop sequences are allowed; {len(v)} were given")
        return v

    @field_validator("adapters", mode="before")
    @classmethod
    def _names_are_choices(cls, v: object) -> object:
        return [{"name": a} if isinstance(a, str) else a for a in v] if isinstance(v, list) else v

    @field_validator("adapters")
    @classmethod
    def _weights_add_up(cls, v: list[AdapterChoice] | None) -> list[AdapterChoice] | None:
        # each weight is finite, their sum must be too: the engine normalizes by it
        if v and not math.isfinite(sum(c.weight for c in v)):
            raise ValueError("the weights add up past the float range; only their ratios count, so scale them down")
        return v

    @field_validator("frequency_penalty", "presence_penalty", mode="before")
    @classmethod
    def _no_penalty(cls, v: object, info: ValidationInfo) -> object:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v != 0:
            raise ValueError(f"{info.field_name} is not supported: only 0 (no penalty)")
        return v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _no_logit_bias(cls, v: object) -> object:
        if isinstance(v, dict) and v:
            raise ValueError("logit_bias is not supported: only an empty object or null")
        return v

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
    modalities: list[Literal["text"]] | None = None  # this model writes text only
    audio: None = None  # audio output: refused

    @field_validator("modalities", mode="before")
    @classmethod
    def _text_only(cls, v: object) -> object:
        if isinstance(v, list) and any(m != "text" for m in v):
            raise ValueError('only ["text"] is supported: this model writes text, not audio')
        return v

    @field_validator("audio", mode="before")
    @classmethod
    def _no_audio(cls, v: object) -> object:
        if v is not None:
            raise ValueError('audio output is not supported: this model writes text only (modalities: ["text"])')
        return v

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
    best_of: OnlyOne | None = None  # one candidate per prompt, as `n`
    suffix: None = None  # text after the insertion point: refused

    @field_validator("suffix", mode="before")
    @classmethod
    def _no_suffix(cls, v: object) -> object:
        if v is not None:
            raise ValueError("suffix (insertion) is not supported: the completion follows the prompt only")
        return v

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


LOGPROB_FLOOR = -9999.0  # what a logprob of -inf reads as: vLLM's floor (JSON has no -inf)


def _json_logprob(value: float) -> float:
    """A token the model rules out has a logprob of -inf, and overflowing logits give NaN: neither is a
    JSON number, so both read as LOGPROB_FLOOR (a probability of e^-9999: none; vLLM clamps -inf so)."""
    return value if math.isfinite(value) else LOGPROB_FLOOR


ReportedLogprob = Annotated[float, PlainSerializer(_json_logprob, return_type=float)]


class TopLogprob(BaseModel):
    token: str
    logprob: ReportedLogprob
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class TextLogprobs(BaseModel):
    """The legacy completions shape; the first prompt token (with `echo`) has no logprob."""

    tokens: list[str]
    token_logprobs: list[ReportedLogprob | None]
    top_logprobs: list[dict[str, ReportedLogprob] | None]
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
