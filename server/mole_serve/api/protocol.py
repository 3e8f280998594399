"""OpenAI request and response models, plus our extension fields. No torch here."""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, Literal, TypeVar

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

from mole_serve.library.store import NAME_PATTERN as STORE_NAME_PATTERN
from mole_serve.routing.types import Composition, MergeStrategy

T = TypeVar("T")
logger = logging.getLogger(__name__)


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
SamplingTopK = Annotated[int, Field(ge=-1), BeforeValidator(_json_number)]  # vLLM's: -1 or 0 = no cut
MinP = Annotated[float, Field(ge=0, le=1), AllowInfNan(False), BeforeValidator(_json_number)]
Penalty = Annotated[float, Field(ge=-2, le=2), AllowInfNan(False), BeforeValidator(_json_number)]
RepetitionPenalty = Annotated[float, Field(gt=0), AllowInfNan(False), BeforeValidator(_json_number)]
TopLogprobs = Annotated[int, Field(ge=0, le=20), BeforeValidator(_json_number)]
CompletionLogprobs = Annotated[int, Field(ge=0, le=5), BeforeValidator(_json_number)]
MAX_CHOICES = 16  # n and best_of: choices generated for one prompt
Choices = Annotated[int, Field(ge=1, le=MAX_CHOICES), BeforeValidator(_json_number)]

NonEmpty = Annotated[T, Field(min_length=1)]
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
TokenId = Annotated[int, Field(ge=0), BeforeValidator(_json_number)]
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
# logit_bias: {token id as a decimal string: bias}; `additionalProperties` tells the schema's readers
# that no other key is taken
LogitBias = Annotated[
    dict[
        Annotated[str, Field(pattern=r"^[0-9]+$")],
        Annotated[float, Field(ge=-100, le=100), AllowInfNan(False), BeforeValidator(_json_number)],
    ],
    Field(max_length=MAX_LOGIT_BIAS, json_schema_extra={"additionalProperties": False}),
]


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
    role: Literal["system"]


class DeveloperMessage(MessageBase):
    """OpenAI's newer name for the system turn; read as one."""

    role: Literal["developer"]


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
ChatMessage = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantTurn | ToolMessage, Field(discriminator="role")
]
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


class TextRequest(BaseModel):
    """A JSON request body whose every string is Unicode text; fields it does not know are ignored."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: object) -> object:
        if _lone_surrogate(data):
            raise ValueError("the request holds a lone UTF-16 surrogate (e.g. \\ud800), which is not valid Unicode")
        return data


class SamplingFields(TextRequest):
    """Fields shared by /v1/chat/completions and /v1/completions. A field of OpenAI's schema that this
    server does not implement is a field here that refuses any value but the one asking for nothing;
    a field of neither schema is ignored with a log line, as vLLM does (clients add their own)."""

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: object) -> object:
        if isinstance(data, dict):
            known = {*cls.model_fields, *(f.alias for f in cls.model_fields.values() if f.alias)}
            if unknown := sorted(str(k)[:64] for k in data if k not in known):  # (bounded: names are the client's)
                names = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
                logger.warning("%s: ignoring fields this server does not know: %s", cls.__name__, names)
        return data

    model: str = "auto"
    max_tokens: PositiveJSONInt | None = None
    temperature: FiniteFloat = Field(1.0, ge=0, le=2)
    top_p: FiniteFloat = Field(1.0, gt=0, le=1)
    seed: JSONInt | None = None  # any integer, as OpenAI takes it (the sampler folds it into 64 bits)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    n: Choices = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: Penalty | None = None  # null: 0
    presence_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None  # ids checked against the vocabulary in serving.sampling_params
    # --- extensions (the openai client's extra_body) ---
    # sampling, as vLLM names and reads them (null: the default)
    top_k: SamplingTopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    min_tokens: JSONInt = Field(0, ge=0)
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: StrictBool = False  # generate max_tokens whatever the model says (benchmarks)
    # adapters
    adapters: list[AdapterChoice] | None = None  # a name alone stands for {"name": name}
    retrieval_top_k: AdapterTopK | None = None  # adapters retrieval keeps for `auto` (docs/api.md)
    composition: Composition | None = None
    merge: MergeOptions | None = None

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

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_keys(cls, v: object) -> object:
        # (the type's own errors would name `logit_bias.<key>.[key]` as the param)
        if isinstance(v, dict):
            if len(v) > MAX_LOGIT_BIAS:
                raise ValueError(f"up to {MAX_LOGIT_BIAS} tokens may be biased; {len(v)} were given")
            bad = next((k for k in v if not (k.isascii() and k.isdigit())), None)
            if bad is not None:
                raise ValueError(f"the key {bad!r} is no token id: keys are token ids, as decimal strings")
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

    def choices_generated(self) -> int:
        """Choices generated per prompt: `n`, or more to rank (completions' best_of)."""
        return self.n

    def prompt_only(self) -> bool:
        """Whether the answer is the prompt alone (completions' echo with max_tokens 0)."""
        return False

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(alternatives per generated token, per prompt token); None: not asked."""
        return None, None


# A request model's fields this server does not implement -> (the values that ask for nothing, why any
# other is refused); each model refuses its own through refuse_unsupported.
Unsupported = dict[str, tuple[tuple[object, ...], str]]


def asks_for_nothing(value: object, accepted: tuple[object, ...]) -> bool:
    # by type too: 0 is not false
    return any(value is a or (type(value) is type(a) and value == a) for a in accepted)


def refuse_unsupported(table: Unsupported, value: object, info: ValidationInfo) -> object:
    """A field validator's body: `value` if it asks for nothing, else a ValueError saying why."""
    assert info.field_name is not None  # (a field's validator)
    accepted, why = table[info.field_name]
    if not asks_for_nothing(value, accepted):
        raise ValueError(why)
    return value


def _not_supported(what: str, accepted: tuple[object, ...] = (None,)) -> tuple[tuple[object, ...], str]:
    return accepted, f"not supported by this server: {what}"


CHAT_UNSUPPORTED: Unsupported = {
    "store": _not_supported("store: true (completions are not stored)", (None, False)),
    "service_tier": _not_supported("service tiers other than auto (one tier)", (None, "auto", "default")),
    "audio": _not_supported('audio output (this model writes text only: modalities ["text"])'),
    "prediction": _not_supported("predicted outputs"),
    "web_search_options": _not_supported("web search"),
    "functions": _not_supported("the deprecated `functions` (send them as `tools`)"),
    "function_call": _not_supported("the deprecated `function_call` (use `tool_choice`)"),
    "reasoning_effort": _not_supported("reasoning effort (the base model does not reason before answering)"),
    "verbosity": _not_supported("verbosity"),
    "metadata": _not_supported("metadata (OpenAI keeps it with stored completions; none are stored here)"),
    "moderation": _not_supported("moderation"),
    "prompt_cache_retention": _not_supported(
        "prompt cache retention (cached prefix blocks stay while KV memory allows)"
    ),
    "prompt_cache_options": _not_supported("prompt cache options (the prefix cache is automatic)"),
}
COMPLETION_UNSUPPORTED: Unsupported = {
    "suffix": ((None,), "suffix (insertion) is not supported: the completion follows the prompt only"),
}


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
    prompt_cache_key: str | None = None  # a cache hint: the prefix cache finds shared prompts by itself
    safety_identifier: str | None = None  # an end user's id, as `user`
    store: Literal[False] | None = None  # nothing is stored
    service_tier: Literal["auto", "default"] | None = None  # one tier
    # --- OpenAI's fields this server does not implement: absent or null, else a 400 naming them ---
    audio: None = None
    prediction: None = None
    web_search_options: None = None
    functions: None = None
    function_call: None = None
    reasoning_effort: None = None
    verbosity: None = None
    metadata: None = None
    moderation: None = None
    prompt_cache_retention: None = None
    prompt_cache_options: None = None

    @field_validator("modalities", mode="before")
    @classmethod
    def _text_only(cls, v: object) -> object:
        if isinstance(v, list) and any(m != "text" for m in v):
            raise ValueError('only ["text"] is supported: this model writes text, not audio')
        return v

    @field_validator(*CHAT_UNSUPPORTED, mode="before")
    @classmethod
    def _unsupported(cls, v: object, info: ValidationInfo) -> object:
        return refuse_unsupported(CHAT_UNSUPPORTED, v, info)

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
    echo: StrictBool = Field(False, validate_default=True)  # (its validator also checks max_tokens 0)
    logprobs: CompletionLogprobs | None = None  # 0: the tokens' own logprobs, no alternatives
    max_tokens: Annotated[int, Field(ge=0), BeforeValidator(_json_number)] | None = None  # 0: with echo
    best_of: Choices | None = None  # choices generated per prompt, the `n` of highest logprob returned
    suffix: None = None  # text after the insertion point: refused

    @field_validator(*COMPLETION_UNSUPPORTED, mode="before")
    @classmethod
    def _unsupported(cls, v: object, info: ValidationInfo) -> object:
        return refuse_unsupported(COMPLETION_UNSUPPORTED, v, info)

    @field_validator("best_of")
    @classmethod
    def _best_of_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if v is not None and v < n:
            raise ValueError(f"best_of ({v}) must be at least n ({n})")
        if v is not None and v > n and info.data.get("stream"):
            raise ValueError("best_of above n cannot be streamed: the choices are ranked once all are finished")
        return v

    @field_validator("echo")
    @classmethod
    def _scoring_needs_echo(cls, v: bool, info: ValidationInfo) -> bool:
        if info.data.get("max_tokens") == 0 and not v:
            raise ValueError("max_tokens 0 needs echo: true (the prompt scored, with no completion)")
        return v

    def token_limit(self) -> int | None:
        if self.max_tokens is None:
            return 16  # OpenAI's default for /v1/completions
        return self.max_tokens or 1  # echo with 0: one token is generated and dropped, as vLLM does

    def choices_generated(self) -> int:
        return self.best_of or self.n

    def prompt_only(self) -> bool:
        return self.max_tokens == 0

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
    # --- extensions, on `auto`'s card (null on the others) ---
    # how `auto` composes the adapters it retrieves: `gate` (the trained MoLE gate) or `mixture`
    # (weights from the retrieval scores, when no gate is served)
    routing: Literal["gate", "mixture"] | None = None
    routing_note: str | None = None  # why the store's trained gate is not served, when it was refused


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- vLLM's own routes (api/vllm_routes.py): runtime LoRA loading and the tokenizer ---
class VLLMRequest(TextRequest):
    """Unknown fields are ignored, as vLLM ignores them."""


class LoadLoRAAdapterRequest(VLLMRequest):
    lora_name: str = Field(pattern=rf"^{STORE_NAME_PATTERN.pattern}$", description="the adapter's model id")
    lora_path: str = Field(
        min_length=1, max_length=4096, pattern=r"^[^\x00]*$", description="its folder, under MOLE_LORA_LOAD_ROOTS"
    )
    load_inplace: StrictBool = False  # replace an adapter of that name (vLLM's field)


class UnloadLoRAAdapterRequest(VLLMRequest):
    lora_name: str = Field(min_length=1)


def _one_input(schema: dict[str, Any]) -> None:
    """TokenizeRequest's schema as it validates: `prompt` or `messages`, exactly one, neither null."""
    for name in ("prompt", "messages"):
        field = schema["properties"][name]
        field.update(next(s for s in field.pop("anyOf") if s != {"type": "null"}))
        del field["default"]
    schema["oneOf"] = [{"required": ["prompt"]}, {"required": ["messages"]}]


class TokenizeRequest(VLLMRequest):
    """A `prompt`, or chat `messages` (with `tools`) rendered as /v1/chat/completions renders them:
    exactly one of the two (None: absent; a null is refused)."""

    model_config = ConfigDict(json_schema_extra=_one_input)
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    add_special_tokens: StrictBool | None = None  # null: true for a prompt, false for messages (the template's)
    add_generation_prompt: StrictBool | None = None  # null: true unless continue_final_message
    continue_final_message: StrictBool = False
    return_token_strs: StrictBool = False

    @field_validator("prompt", "messages")
    @classmethod
    def _not_null(cls, v: object) -> object:
        if v is None:
            raise ValueError("may not be null: leave it out")
        return v


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(VLLMRequest):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str
