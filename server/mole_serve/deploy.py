"""mole-serve on Ray Serve: one ingress deployment serving the same FastAPI app (OpenAI and admin
routes, request and error shapes, SSE) and an engine deployment of N replicas, each one
AsyncEngine on its device. `mole-serve deploy --replicas N` runs it.

Routing. A request naming adapters routes by the one with the largest weight as Ray's multiplexed
model id; `auto` runs retrieval at the ingress (one embedding, then FAISS: routing/, which needs no
engine) and routes by the top-1 hit; the hits travel in the Selection, so the replica does not
embed again. Top-1 and not a key of the whole set: multiplexing matches one id, and a set key
would split the traffic of one adapter over C(n, k) keys whose replicas each hold it anyway, while
the top-1 id is the adapter that carries the largest prior weight, and the rest of a retrieved set
are its neighbours in the embedding space, retrieved together with it: queries near one adapter
land on one replica, whose slots then hold that neighbourhood. A request for the base model
carries no id (Ray's plain power-of-two choice). Ray's per-replica id list (an LRU of
`max_loras` ids, pushed to the routers every 0.1 s) is only the routing table: the LoRA pool stays
the one owner of residency, so a routing miss costs a load, never a wrong answer.

Admin changes. The store lives on storage every replica reads (one path: a shared volume, NFS or
a ReadWriteMany PVC mounted at the same `adapters_dir` on every node). The ingress validates and
commits an upload once (library/catalog.py, unchanged), then `handle.broadcast` tells every live
replica to register the committed folder; the 201 returns after every replica answered and the
ingress's retrieval index holds the key, and a failure rolls all back (the catalog's transaction).
A replica that starts later (autoscaling, a restart) reads the store when it loads.

Outputs. A replica streams a request's outputs to the ingress as lists: each message holds every
output ready when it is sent, so a lagging ingress costs fewer messages, not more latency (vLLM's
AsyncLLM merges outputs for a slow reader the same way). A replica that dies before a request's
first output: the ingress sends it again; after it, a non-streamed request runs again from the
start (api/serving.py, nothing was sent), a stream ends with an error event.

Metrics. /metrics at the ingress is one exposition of the ingress's own collectors and every
replica's, each series labelled `replica` ("ingress" or Ray's replica id): one scrape target
(replicas have no stable address in Ray), per-replica series for the dashboards, and sum() by
the label still gives the cluster's totals. A replica that fails to answer is left out of that
scrape, not failed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from mole_serve.api.app import create_app
from mole_serve.api.metrics import Metrics, merged_exposition
from mole_serve.config import Settings
from mole_serve.engine.client import EngineStats
from mole_serve.engine.request import FinishReason, SamplingParams, StepOutput
from mole_serve.errors import EngineFailure, MoleError, ReplicaLost
from mole_serve.lora.kinds.base import LoRATargetSpec
from mole_serve.routing.types import Selection

APP_NAME = "mole"
ENGINE_NAME = "MoleEngine"
FIRST_OUTPUT_TRIES = 3  # a request whose replica dies before its first output is sent again
BROADCAST_TIMEOUT_S = 120.0  # an admin change waits this long for every replica


@dataclass(frozen=True)
class ReplicaInfo:
    """What the ingress needs of the engine to serve the app without a model of its own."""

    model_name: str
    max_model_len: int
    max_token_chars: int
    has_gate: bool
    spec: LoRATargetSpec  # adapter shapes an upload must fit
    base_names: set[str]


def route_key(selection: Selection | None) -> str:
    """The multiplexed model id of a request: its heaviest named adapter, else retrieval's top hit,
    else "" (the base model: any replica)."""
    if selection is None:
        return ""
    if selection.explicit:
        return max(selection.explicit, key=lambda a: a.weight).name
    return selection.retrieved[0][0] if selection.retrieved else ""


def engine_class(max_models: int) -> type:
    """The engine replica; a class per deployment because @serve.multiplexed takes its size at
    definition time."""

    class EngineReplica:
        def __init__(self, settings: Settings) -> None:
            from mole_serve.compose import build
            from mole_serve.engine.async_engine import AsyncEngine

            built = build(settings, retrieval=False)  # the ingress retrieves
            self.catalog = built.catalog  # this replica's registry of the shared store
            self.metrics = Metrics(settings.metrics_adapter_limit)
            self.aeng = AsyncEngine(built.engine, on_step=self.metrics.observe_step)
            self.metrics.watch_engine(lambda: self.aeng)
            self.replica_id = serve.get_replica_context().replica_id.unique_id
            self._started = False

        def _engine(self):
            if not self._started:  # the step thread delivers to the replica's event loop: start on it
                self.aeng.start()
                self._started = True
            return self.aeng

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def resident(self, model_id: str) -> str:
            """Ray's record that this replica serves `model_id`; the pool loads the weights when a
            step needs them."""
            return model_id

        async def generate(
            self,
            prompt_ids: list[int],
            sampling: SamplingParams,
            selection: Selection | None,
            request_id: str,
            follows: str | None = None,
        ) -> AsyncIterator[list[StepOutput]]:
            """The request's outputs, each message holding every output ready when it is sent."""
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.resident(model_id)
            try:
                stream = self._engine().generate(prompt_ids, sampling, selection, request_id, follows)
            except MoleError as e:  # a refusal: the ingress raises it before any byte is sent
                yield [StepOutput(request_id, None, "", True, FinishReason.ABORT, len(prompt_ids), 0, error=e)]
                return
            try:
                while not stream.finished:
                    yield await stream.next_outputs()
            finally:  # also when the ingress cancels (its client left): frees the KV and batch place
                stream.close()

        async def info(self) -> ReplicaInfo:
            a = self.aeng
            return ReplicaInfo(
                a.model_name,
                a.max_model_len,
                a.max_token_chars,
                a.has_gate,
                a.engine.model.lora_spec(),
                self.catalog.base_names,
            )

        async def add_adapter(self, name: str, folder: str) -> float:
            """Register a committed store folder (read and checked here from the shared path) and serve it."""
            weights = await asyncio.to_thread(self.catalog.add, name, Path(folder))
            return await self._engine().add_adapter(name, weights)

        async def remove_adapter(self, name: str) -> None:
            self.catalog.remove(name)
            await self._engine().remove_adapter(name)

        async def adapters(self) -> tuple[str, list[str]]:
            """(replica id, the adapters it serves): every replica's must agree with the ingress's."""
            return self.replica_id, self.catalog.names

        async def stats(self) -> tuple[str, EngineStats, dict[str, int]]:
            """(replica id, engine stats, requests per adapter)"""
            return self.replica_id, self.aeng.stats(), dict(self.aeng.engine.adapter_usage)

        async def report(self) -> tuple[str, bytes, EngineStats]:
            """(replica id, its Prometheus exposition, engine stats): what the ingress's /metrics reads."""
            return self.replica_id, generate_latest(self.metrics.registry), self.aeng.stats()

        async def check_health(self) -> None:
            if self._started and not self.aeng._thread.is_alive():
                raise RuntimeError("the engine's step thread has stopped")  # Ray restarts the replica

    return EngineReplica


class RemoteStream:
    """One request's outputs from a replica (OutputStream). It routes on first read, so the
    embedding for `auto` runs off the event loop; close() before the end cancels the replica's
    generator, which aborts the request there."""

    def __init__(
        self, remote: RemoteEngine, args: tuple, selection: Selection | None, request_id: str, follows: str | None
    ) -> None:
        self.remote, self.args, self.selection, self.request_id = remote, args, selection, request_id
        self.follows = follows  # (another replica may serve it: then it computes its own prompt)
        self._gen = None
        self._ready: deque[StepOutput] = deque()  # received, not yet read
        self.finished = self.closed = False

    def __aiter__(self) -> RemoteStream:
        return self

    async def _open(self) -> list[StepOutput]:
        sel = self.selection
        if sel is not None and sel.query is not None and not sel.explicit:
            sel = replace(sel, retrieved=tuple(await self.remote.retrieve(sel.query, sel.top_k)))
        handle = self.remote.handle.options(stream=True, multiplexed_model_id=self.remote.model_id(sel))
        for attempt in range(FIRST_OUTPUT_TRIES):
            self._gen = handle.generate.remote(*self.args, sel, self.request_id, self.follows)
            try:
                return await self._gen.__anext__()
            except RayActorError as e:  # the replica died before this request produced anything
                if attempt == FIRST_OUTPUT_TRIES - 1:
                    raise EngineFailure(f"the engine replica failed: {e}") from e
                await asyncio.sleep(0.2 * (attempt + 1))  # the router drops the dead replica meanwhile
        raise AssertionError("unreachable")

    async def __anext__(self) -> StepOutput:
        if self.finished or self.closed:
            raise StopAsyncIteration
        if not self._ready:
            try:
                self._ready.extend(await self._open() if self._gen is None else await self._gen.__anext__())
            except RayActorError as e:
                raise ReplicaLost(f"the engine replica failed mid-request: {e}") from e
        out = self._ready.popleft()
        if out.adapters:
            self.remote.count_usage(out.adapters)
        if out.finished:
            self.finished = True
            self.close()
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.remote.streams.pop(self.request_id, None)
        if self._gen is not None and not self.finished:
            self._gen.cancel()


class RemoteEngine:
    """The EngineClient of the ingress: the tokenizer and the catalog (with retrieval) here, the
    engines behind a handle."""

    def __init__(
        self,
        handle: DeploymentHandle,
        info: ReplicaInfo,
        tokenizer: Any,
        catalog: Any,
        settings: Settings,
        affinity: bool = True,
    ) -> None:
        self.handle, self.settings, self.affinity = handle, settings, affinity
        self.model_name, self.max_model_len = info.model_name, info.max_model_len
        self.max_token_chars, self._has_gate = info.max_token_chars, info.has_gate
        self.tokenizer, self.catalog = tokenizer, catalog
        self.streams: dict[str, RemoteStream] = {}
        self.usage: Counter[str] = Counter()
        self._last_stats: list[EngineStats] = []

    @property
    def has_gate(self) -> bool:
        return self._has_gate

    def model_id(self, selection: Selection | None) -> str:
        return route_key(selection) if self.affinity else ""

    async def retrieve(self, query: str, k: int) -> list[tuple[str, float]]:
        retriever = self.catalog.retriever
        if retriever is None:
            return []
        return (await asyncio.to_thread(retriever.search, [query], k, self.settings.retrieval_floor))[0]

    def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        selection: Selection | None = None,
        request_id: str | None = None,
        follows: str | None = None,
    ) -> RemoteStream:
        request_id = request_id or f"req-{time.monotonic_ns()}-{len(self.streams)}"
        stream = RemoteStream(self, (list(prompt_ids), sampling), selection, request_id, follows)
        self.streams[request_id] = stream
        return stream

    def abort(self, request_id: str) -> None:
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.close()

    def count_usage(self, report: list[dict]) -> None:
        for entry in report:
            self.usage.update([s["name"] for s in entry.get("sources", ())] or [entry["name"]])

    def has_adapter(self, name: str) -> bool:
        return name in self.catalog

    def adapter_usage(self, name: str) -> int:
        return self.usage[name]

    async def add_adapter(self, name: str, weights: Any) -> float:
        """Every replica registers the folder the ingress's catalog committed; -> the slowest load."""
        folder = str(self.catalog.folder(name))
        seconds = await self.handle.broadcast("add_adapter", name, folder).results_async(timeout_s=BROADCAST_TIMEOUT_S)
        return max(seconds, default=0.0)

    async def remove_adapter(self, name: str) -> None:
        await self.handle.broadcast("remove_adapter", name).results_async(timeout_s=BROADCAST_TIMEOUT_S)

    def stats(self) -> EngineStats:
        """The replicas' stats summed, as of the last /metrics scrape."""
        fields = EngineStats.__dataclass_fields__
        return EngineStats(**{f: sum(getattr(s, f) for s in self._last_stats) for f in fields})

    def shutdown(self) -> None:
        """Nothing to stop here: Ray owns the replicas."""

    async def scrape(self, ingress: Metrics) -> bytes:
        """One exposition: the ingress's collectors and each replica's, every series labelled."""
        found = await self.handle.broadcast("report").results_async(timeout_s=10, return_exceptions=True)
        reports = [r for r in found if not isinstance(r, BaseException)]
        self._last_stats = [stats for _, _, stats in reports]
        sources = [("ingress", list(ingress.registry.collect()))]
        sources += [(rid, list(text_string_to_metric_families(text.decode()))) for rid, text, _ in reports]
        return merged_exposition(sources)


def build_app(
    settings: Settings,
    replicas: int = 1,
    autoscaling: dict | None = None,
    replica_cpus: float = 1.0,
    affinity: bool = True,
) -> serve.Application:
    """The Ray Serve application: ingress -> engine deployment. autoscaling: Ray's autoscaling_config
    (replaces `replicas`); affinity=False routes every request by Ray's plain power-of-two choice."""
    app = create_app(settings)
    # /metrics: the merged exposition in place of the single process's
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/metrics"]

    @app.get("/metrics")
    async def prometheus_metrics(request: Request):
        state = request.app.state
        if state.engine is None:
            return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
        return Response(await state.engine.scrape(state.metrics), media_type=CONTENT_TYPE_LATEST)

    class Ingress:
        async def __init__(self, engine: DeploymentHandle, settings: Settings, affinity: bool) -> None:
            """Builds the RemoteEngine; the served app (Ray's copy of `app`) gets it below."""
            from transformers import AutoTokenizer

            from mole_serve.compose import build_library
            from mole_serve.engine.loader import resolve_base_model

            info: ReplicaInfo = await engine.info.remote()  # once a replica has loaded the base model
            tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, resolve_base_model(settings))
            catalog = await asyncio.to_thread(build_library, settings, info.spec, info.base_names)
            await asyncio.to_thread(catalog.add_store)
            self.remote = RemoteEngine(engine, info, tokenizer, catalog, settings, affinity)
            self.catalog = catalog

    class IngressReplica(serve.ingress(app)(Ingress)):
        async def __init__(self, *args: Any) -> None:
            await super().__init__(*args)
            state = self.app.state  # the app this replica serves (Ray unpickled its own copy)
            state.metrics.registry.unregister(state.engine_collector)  # the replicas report theirs
            state.engine, state.catalog = self.remote, self.catalog

    engine_options: dict[str, Any] = {
        "name": ENGINE_NAME,
        "ray_actor_options": {"num_cpus": replica_cpus, "num_gpus": 1 if settings.device == "cuda" else 0},
        # Ray's default (5) would cap the continuous batch; the engine's own queue refuses beyond this
        "max_ongoing_requests": settings.max_num_seqs + settings.max_waiting,
    }
    if autoscaling:
        engine_options["autoscaling_config"] = autoscaling
    else:
        engine_options["num_replicas"] = replicas
    engine = serve.deployment(**engine_options)(engine_class(settings.max_loras))
    ingress = serve.deployment(name="MoleIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)(
        IngressReplica
    )
    return ingress.bind(engine.bind(settings), settings, affinity)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For `serve run` / a KubeRay RayService (import_path: mole_serve.deploy:app_builder): settings
    from MOLE_* variables; args: replicas, replica_cpus, autoscaling (a dict)."""
    return build_app(
        Settings(), int(args.get("replicas", 1)), args.get("autoscaling"), float(args.get("replica_cpus", 1.0))
    )


def run(
    settings: Settings,
    replicas: int,
    autoscaling_file: str | None = None,
    replica_cpus: float = 1.0,
    address: str | None = None,
) -> int:
    """`mole-serve deploy`: connect to (or start) Ray, run the app on settings.host:port until
    Ctrl-C or SIGTERM, then take it down."""
    import signal

    import ray

    from mole_serve.library.store import AdapterStore

    AdapterStore(settings.adapters_dir).recover()  # once, before any replica reads the store
    autoscaling = json.loads(Path(autoscaling_file).read_text()) if autoscaling_file else None
    ray.init(address=address, include_dashboard=False)
    # Ray's proxy is its own uvicorn: of docs/limits.md's connection limits only keep-alive is set there
    serve.start(
        http_options={
            "host": settings.host,
            "port": settings.port,
            "keep_alive_timeout_s": settings.keep_alive_timeout_s,
        }
    )
    serve.run(build_app(settings, replicas, autoscaling, replica_cpus), name=APP_NAME, route_prefix="/")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
