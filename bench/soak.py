"""A soak: `--clients` streaming clients for `--duration` seconds against a running server, and
every 10 s the server's resident memory and running count (from /metrics), /health's latency, and
/health's latency while a maximal prompt (just under MOLE_MAX_REQUEST_MB) is being refused.

    mole-serve serve &   # or make serve
    python -m bench.soak --url http://127.0.0.1:8000 --duration 600 --clients 64 \
        --out bench/results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter

import httpx
import numpy as np

from bench.common import machine, write_json
from bench.load import Timing, prompts, scrape


async def stream_once(http: httpx.AsyncClient, text: str, max_tokens: int) -> tuple[float, float | None, float, int]:
    body = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
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


async def timed_health(http: httpx.AsyncClient) -> float:
    start = time.perf_counter()
    (await http.get("/health")).raise_for_status()
    return (time.perf_counter() - start) * 1e3


async def soak(url: str, n_clients: int, duration: float, max_tokens: int, api_key: str | None,
               big_prompt_mb: float) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    texts, rng = prompts(1000), random.Random(0)
    timing, errors, samples = Timing(), Counter(), []
    deadline = time.perf_counter() + duration
    big = {"model": "auto", "messages": [{"role": "user", "content": "word " * int(big_prompt_mb * 2**20 / 5)}]}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600,
                                 limits=httpx.Limits(max_connections=n_clients + 8)) as http:
        async def client() -> None:
            while time.perf_counter() < deadline:
                try:
                    timing.add(*await stream_once(http, rng.choice(texts), rng.randint(8, max_tokens)))
                except Exception as e:  # counted by kind, the load goes on
                    errors[type(e).__name__ if not isinstance(e, httpx.HTTPStatusError)
                           else f"HTTP {e.response.status_code}"] += 1

        async def sampler() -> None:
            t0 = time.perf_counter()
            while time.perf_counter() < deadline:
                m = scrape((await http.get("/metrics")).text)
                health_ms = await timed_health(http)
                refusal = asyncio.create_task(http.post("/v1/chat/completions", json=big))
                await asyncio.sleep(0.005)  # the big body on its way
                health_during_ms = await timed_health(http)
                status = (await refusal).status_code
                samples.append({"t_s": round(time.perf_counter() - t0, 1),
                                "rss_mb": round(m.get("process_resident_memory_bytes", 0) / 2**20, 1),
                                "running": m.get("mole_requests_running"), "health_ms": round(health_ms, 1),
                                "health_during_big_prompt_ms": round(health_during_ms, 1),
                                "big_prompt_status": status})
                print(samples[-1], flush=True)
                await asyncio.sleep(max(0.0, 10 - (time.perf_counter() - t0) % 10))

        start = time.perf_counter()
        await asyncio.gather(sampler(), *(client() for _ in range(n_clients)))
        wall = time.perf_counter() - start
    result = timing.summary(wall)
    result["errors_by_kind"] = dict(errors)
    result["errors"] += sum(errors.values())
    result["samples"] = samples
    rss = [s["rss_mb"] for s in samples]
    during = [s["health_during_big_prompt_ms"] for s in samples]
    result["rss_mb"] = {"first": rss[0], "max": max(rss), "last": rss[-1]} if rss else {}
    result["health_during_big_prompt_ms"] = {"p50": float(np.percentile(during, 50)), "max": max(during)} if during \
        else {}
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=600, help="seconds")
    ap.add_argument("--max-tokens", type=int, default=64, help="each request asks for 8..this many")
    ap.add_argument("--big-prompt-mb", type=float, default=3.9, help="the maximal prompt, under the body limit")
    ap.add_argument("--api-key")
    ap.add_argument("--out", default="bench/results/soak.json")
    args = ap.parse_args(argv)
    result = asyncio.run(soak(args.url, args.clients, args.duration, args.max_tokens, args.api_key,
                              args.big_prompt_mb))
    print({k: v for k, v in result.items() if k != "samples"})
    write_json(args.out, {**result, "config": vars(args), "machine": machine()})
    return result


if __name__ == "__main__":
    main()
