"""Concurrent streaming clients over HTTP, and the same load against the engine in this process
(so the HTTP overhead shows as a ratio), with prefix caching on and off; then many short streams
at once (admission by KV blocks); or, with --duration, a soak; or, with --distinct N, every client
on its own adapter against the same clients on the base model (one server, rounds interleaved).

    python -m bench.load --serve --clients 32 --requests 128 --max-tokens 64 --streams 256 \
        --out bench/results/load.json
    python -m bench.load --serve --duration 600 --clients 64 --out bench/results/soak.json
    python -m bench.load --serve --distinct 32 --clients 32 --requests 64 --streams 0 \
        --out bench/results/load_distinct.json

--serve starts `mole-serve serve` (the shipped store) on a free loopback port for each setting;
--url measures a server you started instead (its settings as they are).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.common import machine, served, write_json
from bench.throughput import TOPICS

Timed = tuple[float, float | None, float, int]  # (start, first token, end, output tokens)
Item = TypeVar("Item")


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(n)]


def pct(xs: list[float], qs: tuple[int, ...] = (50, 95, 99)) -> dict:
    return {f"p{q}": round(float(np.percentile(xs, q)) * 1000, 1) for q in qs} if xs else {}


class Timing:
    """TTFT, TPOT and latency of each request, plus the total output tokens and errors by kind."""

    def __init__(self) -> None:
        self.ttft, self.tpot, self.latency, self.tokens, self.errors = [], [], [], 0, Counter()

    def add(self, start: float, first: float | None, end: float, tokens: int) -> None:
        if first is None or tokens == 0:
            self.errors["no tokens"] += 1
            return
        self.ttft.append(first - start)
        self.latency.append(end - start)
        if tokens > 1:
            self.tpot.append((end - first) / (tokens - 1))
        self.tokens += tokens

    def failed(self, e: Exception) -> None:
        self.errors[f"HTTP {e.response.status_code}" if isinstance(e, httpx.HTTPStatusError) else type(e).__name__] += 1

    def summary(self, wall: float) -> dict:
        return {
            "ttft_ms": pct(self.ttft),
            "tpot_ms": pct(self.tpot),
            "latency_ms": pct(self.latency),
            "output_tok_s": round(self.tokens / wall, 1),
            "requests": len(self.latency),
            "errors": sum(self.errors.values()),
            "errors_by_kind": dict(self.errors),
            "wall_s": round(wall, 2),
        }


async def stream_chat(http: httpx.AsyncClient, text: str, max_tokens: int, model: str = "auto") -> Timed:
    """One streamed chat completion; model `auto`: retrieval picks the adapters."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    return start, first, time.perf_counter(), tokens


async def scrape(http: httpx.AsyncClient) -> dict[str, float]:
    """The unlabeled samples of /metrics by name (counters as `<name>_total`)."""
    text = (await http.get("/metrics")).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


async def run_clients(
    n_clients: int, items: list[Item], one: Callable[[Item], Awaitable[Timed]]
) -> tuple[Timing, float]:
    """`n_clients` workers take requests (prompts, or what `one` makes a request of) from a shared queue."""
    timing, queue = Timing(), asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            item = queue.get_nowait()
            try:
                timing.add(*await one(item))
            except Exception as e:  # a failed request counts as an error, the load goes on
                timing.failed(e)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n_clients)))
    return timing, time.perf_counter() - start


def client_for(url: str, n_clients: int, api_key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        base_url=url, headers=headers, timeout=600, limits=httpx.Limits(max_connections=n_clients + 8)
    )


async def http_load(
    url: str,
    n_clients: int,
    texts: list[str],
    max_tokens: int,
    api_key: str | None,
    sample_every: float = 0.5,
    models: list[str] | None = None,
) -> dict:
    """The load, with /metrics sampled meanwhile: the largest running batch and KV blocks held,
    and the prefix cache's and preemption counters over the run. models: each text's model
    (default `auto`)."""
    requests = list(zip(texts, models or ["auto"] * len(texts)))
    async with client_for(url, n_clients, api_key) as http:
        await stream_chat(http, requests[0][0], max_tokens, requests[0][1])  # warm-up
        before, peaks, done = await scrape(http), Counter(), asyncio.Event()

        async def sampler() -> None:
            while not done.is_set():
                m = await scrape(http)
                for name in (
                    "mole_requests_running",
                    "mole_kv_blocks_used",
                    "mole_kv_cache_used_bytes",
                    "process_resident_memory_bytes",
                ):
                    peaks[name] = max(peaks[name], m.get(name, 0))
                await asyncio.sleep(sample_every)

        task = asyncio.create_task(sampler())
        timing, wall = await run_clients(n_clients, requests, lambda r: stream_chat(http, r[0], max_tokens, r[1]))
        done.set()
        await task
        after = await scrape(http)
    delta = {
        k: after.get(k, 0) - before.get(k, 0)
        for k in (
            "mole_prefix_cache_queried_tokens_total",
            "mole_prefix_cache_hit_tokens_total",
            "mole_preemptions_total",
        )
    }
    queried = delta["mole_prefix_cache_queried_tokens_total"]
    return {
        **timing.summary(wall),
        "server": {
            "prefix_hit_rate": round(delta["mole_prefix_cache_hit_tokens_total"] / queried, 3) if queried else 0.0,
            "preemptions": int(delta["mole_preemptions_total"]),
            "peak_running": int(peaks["mole_requests_running"]),
            "peak_kv_blocks_used": int(peaks["mole_kv_blocks_used"]),
            "kv_blocks_total": int(after.get("mole_kv_blocks_capacity", 0)),
            "peak_kv_used_mb": round(peaks["mole_kv_cache_used_bytes"] / 2**20, 1),
            "peak_rss_mb": round(peaks["process_resident_memory_bytes"] / 2**20, 1),
        },
    }


def engine_load(
    n_clients: int,
    texts: list[str],
    max_tokens: int,
    prefix_caching: bool,
    adapters: list[str | None] | None = None,
    **settings: object,
) -> dict:
    """The same clients against an AsyncEngine in this process, stepped on the main thread as
    `mole-serve serve` does, with the clients' event loop in a thread. adapters: each text's adapter
    (None: the base model; default: none named, model `auto`); settings: more Settings fields."""
    from mole_serve.compose import build
    from mole_serve.config import Settings
    from mole_serve.engine.async_engine import AsyncEngine
    from mole_serve.engine.request import SamplingParams
    from mole_serve.routing.types import AdapterRef, Selection

    aeng = AsyncEngine(build(Settings(enable_prefix_caching=prefix_caching, **settings)).engine)
    tokenizer = aeng.engine.tokenizer
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    loop, result = asyncio.new_event_loop(), {}
    requests = list(zip(texts, adapters or [None] * len(texts)))

    async def one(request: tuple[str, str | None]) -> Timed:
        text, adapter = request
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        selection = Selection("mixture", (AdapterRef(adapter),)) if adapter else None
        start, first, tokens = time.perf_counter(), None, 0
        async for out in aeng.generate(ids, params, selection):
            if first is None and out.text:
                first = time.perf_counter()
            tokens = out.num_output_tokens
        return start, first, time.perf_counter(), tokens

    async def clients() -> None:
        try:
            await one(requests[0])
            timing, wall = await run_clients(n_clients, requests, one)
            result.update(timing.summary(wall))
        finally:
            aeng.shutdown()

    thread = threading.Thread(target=loop.run_until_complete, args=(clients(),))
    thread.start()
    aeng.run_forever(loop)
    thread.join()
    return result


async def timed_health(http: httpx.AsyncClient) -> float:
    start = time.perf_counter()
    (await http.get("/health")).raise_for_status()
    return (time.perf_counter() - start) * 1e3


async def soak(
    url: str, n_clients: int, duration: float, max_tokens: int, api_key: str | None, big_prompt_mb: float
) -> dict:
    """Clients streaming back to back for `duration` s (8..max_tokens tokens each); every 10 s the
    server's RSS and running batch, /health's latency, and /health's latency while a maximal
    prompt (just under MOLE_MAX_REQUEST_MB) is being refused."""
    texts, rng = prompts(1000), random.Random(0)
    timing, samples = Timing(), []
    deadline = time.perf_counter() + duration
    big = {"model": "auto", "messages": [{"role": "user", "content": "word " * int(big_prompt_mb * 2**20 / 5)}]}
    async with client_for(url, n_clients, api_key) as http:

        async def client() -> None:
            while time.perf_counter() < deadline:
                try:
                    timing.add(*await stream_chat(http, rng.choice(texts), rng.randint(8, max_tokens)))
                except Exception as e:  # counted by kind, the load goes on
                    timing.failed(e)

        async def sampler() -> None:
            t0 = time.perf_counter()
            while time.perf_counter() < deadline:
                m = await scrape(http)
                health_ms = await timed_health(http)
                refusal = asyncio.create_task(http.post("/v1/chat/completions", json=big))
                await asyncio.sleep(0.005)  # the big body on its way
                health_during_ms = await timed_health(http)
                samples.append(
                    {
                        "t_s": round(time.perf_counter() - t0, 1),
                        "rss_mb": round(m.get("process_resident_memory_bytes", 0) / 2**20, 1),
                        "running": m.get("mole_requests_running"),
                        "kv_used_mb": round(m.get("mole_kv_cache_used_bytes", 0) / 2**20, 1),
                        "health_ms": round(health_ms, 1),
                        "health_during_big_prompt_ms": round(health_during_ms, 1),
                        "big_prompt_status": (await refusal).status_code,
                    }
                )
                print(samples[-1], flush=True)
                await asyncio.sleep(max(0.0, 10 - (time.perf_counter() - t0) % 10))

        start = time.perf_counter()
        await asyncio.gather(sampler(), *(client() for _ in range(n_clients)))
        wall = time.perf_counter() - start
    rss = [s["rss_mb"] for s in samples]
    during = [s["health_during_big_prompt_ms"] for s in samples]
    return {
        **timing.summary(wall),
        "samples": samples,
        "rss_mb": {"first": rss[0], "max": max(rss), "last": rss[-1]} if rss else {},
        "health_during_big_prompt_ms": {"p50": float(np.median(during)), "max": max(during)} if during else {},
    }


def distinct_load(args: argparse.Namespace, tmp: Path) -> dict:
    """Every request on its own adapter (args.distinct synthetic rank-8 LoRAs on every projection, in
    a store of their own, request i on adapter i mod N) against the same requests on the base model:
    one server, `args.rounds` rounds of (base, distinct) interleaved, the best round of each counts
    (this machine's speed drifts between minutes)."""
    from mole_serve.compose import build
    from mole_serve.config import Settings

    from bench.common import synthetic_adapter

    engine = build(Settings(), retrieval=False, load_store=False).engine
    spec, base_model = engine.model.lora_spec(), engine.model_name
    del engine
    names = [f"lora{i:03d}" for i in range(args.distinct)]
    for i, name in enumerate(names):
        synthetic_adapter(tmp / "store" / name, spec, rank=8, seed=i)
    texts = prompts(args.requests)
    # each request's adapter per kind (None: the base model)
    assigned = {"base": [None] * len(texts), "distinct": [names[i % len(names)] for i in range(len(texts))]}
    settings = {"adapters_dir": tmp / "store", "max_loras": args.distinct, "max_num_seqs": args.clients}
    env = {f"MOLE_{k.upper()}": str(v) for k, v in settings.items()}
    env["MOLE_ENABLE_PREFIX_CACHING"] = "false"  # each round prefills as the first did
    runs: dict[str, dict[str, list[dict]]] = {
        "http": {k: [] for k in assigned},
        "in_process": {k: [] for k in assigned},
    }
    with served(env, tmp / "server.log") as (url, _):
        for _ in range(args.rounds):
            for kind, adapters in assigned.items():
                models = [a or base_model for a in adapters]
                load = http_load(url, args.clients, texts, args.max_tokens, args.api_key, models=models)
                runs["http"][kind].append(asyncio.run(load))
    for _ in range(args.rounds):
        for kind, adapters in assigned.items():
            runs["in_process"][kind].append(
                engine_load(args.clients, texts, args.max_tokens, False, adapters, **settings)
            )
    best = {
        where: {k: max(r["output_tok_s"] for r in rs) for k, rs in by_kind.items()} for where, by_kind in runs.items()
    }
    for where, by_kind in best.items():
        print(f"{where}: {by_kind} tok/s (best of {args.rounds})", flush=True)
    return {
        **runs,
        "best_output_tok_s": best,
        "ratios": {
            f"{where.replace('_', '-')} distinct/base": round(b["distinct"] / b["base"], 3) for where, b in best.items()
        },
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server")
    where.add_argument("--serve", action="store_true", help="start the server for each setting (default)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128, help="0: only the streams")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=256, help="short streams at once (0: skip)")
    ap.add_argument("--stream-tokens", type=int, default=64)
    ap.add_argument("--duration", type=float, help="soak for this many seconds instead")
    ap.add_argument("--big-prompt-mb", type=float, default=3.9, help="soak: the maximal prompt, under the body limit")
    ap.add_argument(
        "--distinct", type=int, default=0, help="N > 0: each request on one of N adapters, against the base"
    )
    ap.add_argument("--rounds", type=int, default=2, help="--distinct: interleaved rounds; the best of each counts")
    ap.add_argument("--api-key")
    ap.add_argument("--out", default="bench/results/load.json")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mole-bench-load-"))
    if args.distinct:
        if args.url:
            ap.error("--distinct starts its own server on a store of synthetic adapters (no --url)")
        result = {**distinct_load(args, tmp), "config": vars(args), "machine": machine()}
        print(f"ratios: {result['ratios']}")
        write_json(args.out, result)
        return result

    def server(**settings: str):
        """(url, pid) of the server to load: ours with these settings, or --url's as it is."""
        if args.url:
            return nullcontext((args.url, None))
        return served({f"MOLE_{k.upper()}": v for k, v in settings.items()}, tmp / "server.log")

    if args.duration:
        with server() as (url, _):
            result = asyncio.run(
                soak(url, args.clients, args.duration, args.max_tokens, args.api_key, args.big_prompt_mb)
            )
        print({k: v for k, v in result.items() if k != "samples"})
        write_json(args.out, {**result, "config": vars(args), "machine": machine()})
        return result

    results: dict = {"config": vars(args), "machine": machine()}
    if args.streams:
        with server() as (url, _):
            results["streams"] = asyncio.run(
                http_load(url, args.streams, prompts(args.streams), args.stream_tokens, args.api_key, sample_every=0.2)
            )
        print(f"{args.streams} streams:", results["streams"], flush=True)
    if not args.requests:
        write_json(args.out, results)
        return results
    texts = prompts(args.requests)
    http, inproc = results["http"], results["in_process"] = {}, {}
    for prefix in ("on", "off") if not args.url else ("as served",):
        with server(enable_prefix_caching=str(prefix == "on").lower()) as (url, _):
            http[prefix] = asyncio.run(http_load(url, args.clients, texts, args.max_tokens, args.api_key))
            print(f"http prefix caching {prefix}:", http[prefix], flush=True)
    for prefix in ("on", "off"):
        inproc[prefix] = engine_load(args.clients, texts, args.max_tokens, prefix == "on")
        print(f"in-process prefix caching {prefix}:", inproc[prefix], flush=True)

    head = next(iter(http))
    results["ratios"] = {"http/in_process": round(http[head]["output_tok_s"] / inproc["on"]["output_tok_s"], 3)}
    if "off" in http:
        results["ratios"]["ttft_p50 on/off"] = round(http["on"]["ttft_ms"]["p50"] / http["off"]["ttft_ms"]["p50"], 3)
        results["ratios"]["tok_s on/off"] = round(http["on"]["output_tok_s"] / http["off"]["output_tok_s"], 3)
    print(f"\nratios: {results['ratios']}")
    print("| run | prefix caching | tok/s | TTFT p50 ms | TTFT p95 ms | TPOT p50 ms | latency p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for where_, runs in (("http", http), ("in-process", inproc)):
        for prefix, r in runs.items():
            print(
                f"| {where_} | {prefix} | {r['output_tok_s']} | {r['ttft_ms'].get('p50')} | "
                f"{r['ttft_ms'].get('p95')} | {r['tpot_ms'].get('p50')} | {r['latency_ms'].get('p99')} | "
                f"{r['errors']} |"
            )
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
