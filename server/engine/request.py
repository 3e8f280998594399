"""Request-side state: sampling parameters, one sequence's tokens and progress. Pure Python."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class AdapterRef:
    """One member of a request's adapter set: an adapter by name and its prior weight."""

    name: str
    weight: float = 1.0


COMPOSITIONS = ("gate", "mixture", "select", "merge")
MERGE_STRATEGIES = ("linear", "cat", "ties", "dare_linear", "dare_ties")


@dataclass(frozen=True)
class MergeSpec:
    strategy: str = "linear"
    density: float = 1.0  # kept fraction for ties / dare
    seed: int = 0  # dare's random drop


@dataclass(frozen=True)
class Selection:
    """How a request's adapters are chosen; the engine resolves it when the request enters (retrieval
    embeds a step's new requests together). Candidates are `explicit` when given (MoLE's branch
    masking: the gate renormalizes over them), else the top_k retrieved for `query`."""

    composition: str  # one of COMPOSITIONS
    explicit: tuple[AdapterRef, ...] = ()
    query: str | None = None
    top_k: int = 3
    merge: MergeSpec = MergeSpec()

    def __post_init__(self) -> None:
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {', '.join(COMPOSITIONS)}")
        if self.merge.strategy not in MERGE_STRATEGIES:
            raise ValueError(f"merge strategy must be one of {', '.join(MERGE_STRATEGIES)}")
        if not 0 < self.merge.density <= 1:
            raise ValueError("merge density must be in (0, 1]")


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
    adapters: tuple[AdapterRef, ...] = ()
    request_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")
    token_ids: list[int] = field(init=False)
    num_computed: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    kv_slot: int | None = None
    # Pool slot ids of `adapters`, filled when the pool makes them resident.
    lora_slots: tuple[int, ...] = ()
    selection: Selection | None = None  # None: `adapters` is final; else resolved by the engine
    gated: bool = False  # the gate weighs `adapters` per layer and token; their weights are a mask
    scores: dict[str, float] = field(default_factory=dict)  # retrieval score per chosen adapter
    sources: tuple[str, ...] = ()  # the adapters a merge was built from
    # Gate statistics summed over layers and tokens: weight per adapter, entropy; and the count.
    gate_sums: list[float] = field(default_factory=list)
    gate_count: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")
        self.token_ids = list(self.prompt_ids)

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
