"""Prometheus collectors (names prefixed `mole_`), one registry per app."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from mole_serve.engine.client import EngineClient

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class EngineCollector(Collector):
    """Reads the engine's state at scrape time, so nothing in the step loop has to update it."""

    def __init__(self, get_engine: Callable[[], EngineClient | None]) -> None:
        self.get_engine = get_engine

    def collect(self):
        engine = self.get_engine()
        if engine is None:
            return
        s = engine.stats()
        yield GaugeMetricFamily("mole_requests_running", "Sequences in the running batch", s.running)
        yield GaugeMetricFamily("mole_requests_waiting", "Requests queued for admission", s.waiting)
        yield GaugeMetricFamily(
            "mole_kv_cache_usage_ratio",
            "Fraction of KV blocks held by running sequences",
            s.kv_blocks_used / s.kv_blocks_total,
        )
        yield GaugeMetricFamily("mole_kv_blocks_used", "KV blocks held by running sequences", s.kv_blocks_used)
        # `_total` is the counters' suffix (promtool lints a gauge named so): a pool's size is its capacity
        yield GaugeMetricFamily("mole_kv_blocks_capacity", "KV blocks in the pool", s.kv_blocks_total)
        yield GaugeMetricFamily(
            "mole_kv_cache_used_bytes", "KV memory held by running sequences", s.kv_blocks_used * s.kv_block_bytes
        )
        yield CounterMetricFamily(
            "mole_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache", s.prefix_queried_tokens
        )
        yield CounterMetricFamily(
            "mole_prefix_cache_hit_tokens",
            "Prompt tokens whose KV came from the prefix cache (hit rate: this over the queried tokens)",
            s.prefix_hit_tokens,
        )
        yield CounterMetricFamily(
            "mole_preemptions", "Sequences preempted for KV blocks (recomputed later)", s.preemptions
        )
        yield GaugeMetricFamily("mole_adapter_slots_used", "Adapters resident in device slots", s.lora_slots_used)
        yield GaugeMetricFamily("mole_adapter_slots_capacity", "Device adapter slots", s.lora_slots_total)
        yield CounterMetricFamily("mole_adapter_loads", "Adapters loaded into a device slot", s.adapter_loads)
        yield CounterMetricFamily("mole_adapter_evictions", "Adapters evicted from a device slot", s.adapter_evictions)


class AdapterLibrary(Protocol):
    """What the library collector reads of the catalog (library/catalog.py; no torch here)."""

    @property
    def failed(self) -> Mapping[str, str]: ...  # stored adapters not served -> why


class LibraryCollector(Collector):
    """Reads the adapter library at scrape time: the stored adapters that could not be served."""

    def __init__(self, get_library: Callable[[], AdapterLibrary | None]) -> None:
        self.get_library = get_library

    def collect(self):
        library = self.get_library()
        if library is None:
            return
        yield GaugeMetricFamily(
            "mole_adapters_failed",
            "Adapters in the store that did not validate and are not served (GET /admin/adapters says why)",
            len(library.failed),
        )


class Metrics:
    def __init__(self, adapter_label_limit: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds (Linux)
        self.requests = Counter(
            "mole_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "mole_request_latency_seconds",
            "End-to-end latency of a generation request",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "mole_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "mole_time_per_output_token_seconds",
            "Time per output token after the first",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("mole_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("mole_completion_tokens", "Completion tokens generated", registry=r)
        self.batch_size = Histogram(
            "mole_batch_size", "Sequences per engine step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.adapter_requests = Counter(
            "mole_adapter_requests",
            "Requests served per adapter, explicit or selected by retrieval (bounded labels)",
            ["adapter"],
            registry=r,
        )
        self.retrieval_latency = Histogram(
            "mole_retrieval_latency_seconds",
            "Adapter retrieval (embedding + search) per engine step batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self.gate_entropy = Histogram(
            "mole_gate_entropy_nats",
            "Mean entropy of the gate's weights over a gated request's layers and tokens",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4),
            registry=r,
        )
        self.expert_usage = Counter(
            "mole_expert_usage",
            "A mixture-of-LoRA-experts adapter's mean routing weight per expert over a "
            "request's generated tokens, summed over requests (divide by mole_adapter_requests for the mean)",
            ["adapter", "expert"],
            registry=r,
        )
        self._adapter_labels: set[str] = set()
        self._adapter_label_limit = adapter_label_limit

    def watch_engine(self, get_engine: Callable[[], EngineClient | None]) -> EngineCollector:
        collector = EngineCollector(get_engine)
        self.registry.register(collector)
        return collector

    def watch_library(self, get_library: Callable[[], AdapterLibrary | None]) -> LibraryCollector:
        collector = LibraryCollector(get_library)
        self.registry.register(collector)
        return collector

    def observe_adapters(self, report: list[dict], gate_entropy: float | None) -> None:
        """One finished request's adapters (the engine's report); a merge counts its sources."""
        for entry in report:
            for name in [s["name"] for s in entry.get("sources", ())] or [entry["name"]]:
                self.count_adapter(name)
            for expert, usage in enumerate(entry.get("expert_usage", ())):
                self.expert_usage.labels(self._label(entry["name"]), str(expert)).inc(usage)
        if gate_entropy is not None:
            self.gate_entropy.observe(gate_entropy)

    def observe_step(self, batch_size: int, retrieval_seconds: list[float]) -> None:
        """Called by the engine thread after each step."""
        self.batch_size.observe(batch_size)
        for s in retrieval_seconds:
            self.retrieval_latency.observe(s)

    def count_adapter(self, name: str) -> None:
        self.adapter_requests.labels(self._label(name)).inc()

    def _label(self, name: str) -> str:
        """The adapter's label, or `other` past the label limit (bounded cardinality)."""
        if name not in self._adapter_labels and len(self._adapter_labels) < self._adapter_label_limit:
            self._adapter_labels.add(name)
        return name if name in self._adapter_labels else "other"


def merged_exposition(sources: list[tuple[str, list[Metric]]]) -> bytes:
    """Families of the same name from several processes merged into one, each sample given the
    label replica=<source> (Prometheus refuses a family named twice in one exposition)."""
    merged: dict[str, Metric] = {}
    for replica, families in sources:
        for fam in families:
            into = merged.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            for s in fam.samples:
                into.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)

    class Collected:
        def collect(self):
            return merged.values()

    return generate_latest(Collected())
