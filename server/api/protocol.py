"""OpenAI request and response models, plus our extension fields. No torch here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from server.routing.types import Composition, MergeStrategy


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
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


class AdapterChoice(BaseModel):
    name: str
    weight: float = Field(1.0, gt=0)


class MergeOptions(BaseModel):
    """Composition `merge`: a static merge of the request's adapters (PEFT's add_weighted_adapter)."""

    strategy: MergeStrategy = "linear"
    density: float = Field(1.0, gt=0, le=1)  # kept fraction for ties / dare
    seed: int = 0  # dare's random drop


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


def _lone_surrogate(value: object) -> bool:
    """Whether a JSON value holds a string with a lone UTF-16 surrogate ("\\ud800"): valid JSON,
    but no Unicode text; the tokenizer and every UTF-8 encoder refuse it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # C speed, where a scan per character would take a second on 20 MB
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
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    user: str | None = None
    # --- extensions (the openai client's extra_body) ---
    adapters: list[AdapterChoice] | None = None  # a name alone stands for {"name": name}
    top_k: int | None = Field(None, ge=1, le=16)  # adapters retrieval keeps for `auto` (DESIGN section 2)
    composition: Composition | None = None
    merge: MergeOptions | None = None
    ignore_eos: StrictBool = False  # as in vLLM: generate max_tokens whatever the model says (benchmarks)

    @field_validator("adapters", mode="before")
    @classmethod
    def _names_are_choices(cls, v: object) -> object:
        return [{"name": a} if isinstance(a, str) else a for a in v] if isinstance(v, list) else v

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def adapter_choices(self) -> list[AdapterChoice]:
        return list(self.adapters or [])


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(min_length=1)
    echo: StrictBool = False

    def token_limit(self) -> int | None:
        return self.max_tokens or 16  # OpenAI's default for /v1/completions

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


# --- responses (built with exclude_unset: a chunk carries only the fields set on it) ---
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage | None = None  # the whole answer
    delta: dict[str, str] | None = None  # a streamed piece: {"role", "content"}, {"content"} or {}
    logprobs: None = None
    finish_reason: str | None = None


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
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
