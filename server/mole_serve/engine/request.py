"""Request-side state: sampling parameters, one sequence's tokens and progress. Pure Python."""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mole_serve.errors import InvalidRequest, MoleError
from mole_serve.routing.types import AdapterRef, Chosen, Selection, gate_entropy, report

if TYPE_CHECKING:
    import llguidance

# One token's log-probability under the model (log_softmax of its raw logits, as vLLM's default):
# (token id, logprob, the top alternatives as (token id, logprob), most likely first).
Logprob = tuple[int, float, tuple[tuple[int, float], ...]]
MAX_TOP_LOGPROBS = 20  # OpenAI's top_logprobs limit
# vLLM's: a temperature under it is greedy, its limit (dividing by it would overflow float32 logits to inf)
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # under GREEDY_BELOW = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 (vLLM's "off") = no top-k cut
    min_p: float = 0.0  # drop tokens under min_p times the most likely one's probability (vLLM)
    # OpenAI's: logit -= frequency_penalty * count + presence_penalty * (count > 0), over the output
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # vLLM's / HF's, over the prompt and the output: a positive logit divided by it, a negative multiplied
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), ids distinct
    # EOS and stop_token_ids are masked and stop strings unchecked until this many tokens are out (vLLM);
    # may exceed max_tokens (an input form's longer prompt shrinks max_tokens): the length limit wins
    min_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # each generated token's logprob with this many alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (completions' echo)
    grammar: str | None = None  # an llguidance grammar the output must match (engine/structured.py)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", "max_tokens")
        if self.temperature < 0:
            raise InvalidRequest("temperature must be >= 0", "temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", "top_p")
        if self.top_k < -1:
            raise InvalidRequest("top_k must be -1 or 0 (no cut), or at least 1", "top_k")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequest("min_p must be in [0, 1]", "min_p")
        for field_name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, field_name) <= 2:
                raise InvalidRequest(f"{field_name} must be in [-2, 2]", field_name)
        if not 0 < self.repetition_penalty < math.inf:
            raise InvalidRequest("repetition_penalty must be > 0", "repetition_penalty")
        ids = [t for t, _ in self.logit_bias]
        if len(set(ids)) != len(ids) or min(ids, default=0) < 0:
            raise InvalidRequest("logit_bias must name distinct token ids >= 0", "logit_bias")
        if not all(-100 <= bias <= 100 for _, bias in self.logit_bias):
            raise InvalidRequest("logit_bias values must be in [-100, 100]", "logit_bias")
        if self.min_tokens < 0:
            raise InvalidRequest("min_tokens must be >= 0", "min_tokens")
        if min(self.stop_token_ids, default=0) < 0:
            raise InvalidRequest("stop_token_ids must be token ids >= 0", "stop_token_ids")
        for field_name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, field_name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise InvalidRequest(f"{field_name} must be between 0 and {MAX_TOP_LOGPROBS}", field_name)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Whether its logits depend on the tokens so far (the sampler counts them)."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0 or self.repetition_penalty != 1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """A request inside the engine. `token_ids` = prompt + generated; the first `num_computed`
    of them have their keys/values in the KV cache."""

    prompt_ids: list[int]
    sampling: SamplingParams
    chosen: Chosen = field(default_factory=Chosen)  # its adapters, final unless `selection` is set
    request_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")
    token_ids: list[int] = field(init=False)
    num_computed: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    # Its KV blocks in position order while it runs (block_manager.py), the hashes of the full
    # computed ones, and what its KV depends on besides the tokens (its adapter set, see engine).
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    prefix_key: Hashable = ()
    # The lora slots of its adapters (pool residency), filled when the pool makes them resident.
    lora_slots: tuple[int, ...] = ()
    selection: Selection | None = None  # None: `chosen` is final; else the engine resolves it
    # Gate statistics summed over layers and tokens: weight per adapter, entropy; and the count.
    gate_sums: list[float] = field(default_factory=list)
    gate_count: int = 0
    # A MoE-kind adapter's routing weight per expert, summed over its generated tokens and routers.
    expert_usage: list[float] = field(default_factory=list)
    # With sampling.prompt_logprobs: per prompt token, its Logprob (None for the first), filled by prefill.
    prompt_logprobs: list[Logprob | None] = field(default_factory=list)
    # With sampling.grammar: its llguidance matcher, which has consumed every generated token.
    matcher: llguidance.LLMatcher | None = None
    # Another choice of the same request (`n`) whose prompt this one waits for, to find its KV
    # blocks in the prefix cache instead of computing them again.
    leader: Sequence | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        self.token_ids = list(self.prompt_ids)

    @property
    def adapters(self) -> tuple[AdapterRef, ...]:
        return self.chosen.adapters

    @property
    def gated(self) -> bool:
        return self.chosen.gated

    def report(self) -> list[dict]:
        """Its adapters as the response tells them (names, weights, scores, gate means)."""
        return report(self.chosen, self.gate_sums, self.gate_count, self.expert_usage)

    def gate_entropy(self) -> float | None:
        return gate_entropy(self.chosen, self.gate_sums, self.gate_count)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class StepOutput:
    request_id: str
    token_id: int | None  # None when the output only reports an end (abort, error)
    text: str  # new text since the last output
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: MoleError | None = None  # why the request ended early (its kind says whose fault)
    adapters: list[dict] | None = None  # the adapter report, on a request's first and last output
    gate_entropy: float | None = None  # on the last output of a gated request
    logprob: Logprob | None = None  # the new token's, when sampling.logprobs is set
    prompt_logprobs: list[Logprob | None] | None = None  # on the first output, with sampling.prompt_logprobs
