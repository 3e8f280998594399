"""EngineClient: the narrow protocol through which the API (and later a Ray replica's handle)
reaches an engine. No torch here: the HTTP layer imports it. AsyncEngine implements it for an
engine in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from mole_serve.engine.request import SamplingParams, StepOutput
from mole_serve.routing.types import Selection


@dataclass
class EngineStats:
    """A snapshot for /metrics, read at scrape time."""

    running: int
    waiting: int
    kv_blocks_used: int  # referenced by running sequences
    kv_blocks_total: int
    kv_block_bytes: int  # one block over all layers, K and V
    prefix_queried_tokens: int  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int  # of those, served from it
    preemptions: int
    lora_slots_used: int
    lora_slots_total: int
    adapter_loads: int
    adapter_evictions: int


class OutputStream(Protocol):
    """One request's outputs; close() before the end aborts it (idempotent)."""

    request_id: str

    def __aiter__(self) -> AsyncIterator[StepOutput]: ...

    def close(self) -> None: ...


class EngineClient(Protocol):
    model_name: str  # the base model's id
    max_model_len: int
    max_token_chars: int  # the most characters one token of the tokenizer stands for
    tokenizer: Any  # the base model's (chat template, counting)

    @property
    def has_gate(self) -> bool: ...  # a trained MoLE gate is loaded (composition `gate` possible)

    def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        selection: Selection | None = None,
        request_id: str | None = None,
        follows: str | None = None,
    ) -> OutputStream:
        """Submit now (bad input and a full queue raise here, as error kinds). follows: the request
        id of an earlier choice of the same prompt (`n`): the engine may reuse its prompt's KV."""

    def abort(self, request_id: str) -> None: ...

    def has_adapter(self, name: str) -> bool: ...

    def adapter_usage(self, name: str) -> int: ...  # requests served with it

    def add_adapter(self, name: str, weights: Any) -> Awaitable[float]: ...  # after the library registered it

    def remove_adapter(self, name: str) -> Awaitable[None]: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...
