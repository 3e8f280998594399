"""OpenAI request schemas (plus our extension fields) and the OpenAI error shape. No torch here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class AdapterChoice(BaseModel):
    name: str
    weight: float = Field(1.0, gt=0)


class MergeOptions(BaseModel):
    """Composition `merge`: a static merge of the request's adapters (PEFT's add_weighted_adapter)."""

    strategy: Literal["linear", "cat", "ties", "dare_linear", "dare_ties"] = "linear"
    density: float = Field(1.0, gt=0, le=1)  # kept fraction for ties / dare
    seed: int = 0  # dare's random drop


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = "auto"
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    user: str | None = None
    # --- extensions (the openai client's extra_body) ---
    adapters: list[str | AdapterChoice] | None = None
    top_k: int | None = Field(None, ge=1, le=16)  # adapters retrieval keeps for `auto` (DESIGN section 2)
    composition: Literal["gate", "mixture", "select", "merge"] | None = None
    merge: MergeOptions | None = None
    ignore_eos: bool = False  # as in vLLM: generate max_tokens whatever the model says (benchmarks)

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
        return [a if isinstance(a, AdapterChoice) else AdapterChoice(name=a) for a in self.adapters or []]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool = False

    def token_limit(self) -> int | None:
        return self.max_tokens or 16  # OpenAI's default for /v1/completions

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
