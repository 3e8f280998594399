"""Concurrent streaming clients over HTTP against a running server, then the same load against
the engine in this process, so the HTTP overhead shows as a ratio.

    mole-serve serve &   # or make serve
    python -m bench.load --url http://127.0.0.1:8000 --clients 32 --requests 128 --max-tokens 64 \
        --out bench/results/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import httpx
import numpy as np

from bench.common import machine, write_json
from bench.throughput import TOPICS


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(n)]


class Timing:
    """TTFT, TPOT and latency of each request, plus the total output tokens and errors."""

    def __init__(self) -> None:
        self.ttft, self.tpot, self.latency, self.tokens, self.errors = [], [], [], 0, 0

    def add(self, start: float, first: float | None, end: float, tokens: int) -> None:
        if first is None or tokens == 0:
            self.errors += 1
            return
        self.ttft.append(first - start)
        self.latency.append(end - start)
        if tokens > 1:
            self.tpot.append((end - first) / (tokens - 1))
        self.tokens += tokens

    def summary(self, wall: float) -> dict:
        def pct(xs: list[float]) -> dict:
            if not xs:
                return {}
            return {f"p{q}": round(float(np.percentile(xs, q)) * 1000, 1) for q in (50, 95, 99)}

        return {"ttft_ms": pct(self.ttft), "tpot_ms": pct(self.tpot), "latency_ms": pct(self.latency),
                "output_tok_s": round(self.tokens / wall, 1), "requests": len(self.latency), "errors": self.errors,
                "wall_s": round(wall, 2)}


async def run_clients(n_clients: int, texts: list[str], one) -> tuple[Timing, float]:
    """`n_clients` workers take prompts from a shared queue; one(text) -> (start, first, end, tokens)."""
    timing, queue = Timing(), asyncio.Queue()
    for t in texts:
        queue.put_nowait(t)

    async def worker() -> None:
        while not queue.empty():
            text = queue.get_nowait()
            try:
                timing.add(*await one(text))
            except Exception:  # a failed request counts as an error, the load goes on
                timing.errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n_clients)))
    return timing, time.perf_counter() - start


async def http_load(url: str, n_clients: int, texts: list[str], max_tokens: int, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=n_clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:
        async def one(text: str):
            body = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            start, first, tokens = time.perf_counter(), None, 0
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif first is None and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter()
            return start, first, time.perf_counter(), tokens

        await one(texts[0])  # warm-up
        timing, wall = await run_clients(n_clients, texts, one)
    return timing.summary(wall)


def engine_load(n_clients: int, texts: list[str], max_tokens: int) -> dict:
    """The same clients against an AsyncEngine in this process, stepped on the main thread as
    `mole-serve serve` does, with the clients' event loop in a thread."""
    from server.__main__ import load_engine
    from server.config import Settings
    from server.engine.async_engine import AsyncEngine
    from server.engine.request import SamplingParams

    aeng = AsyncEngine(load_engine(Settings()))
    tokenizer = aeng.engine.tokenizer
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    loop, result = asyncio.new_event_loop(), {}

    async def one(text: str):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        start, first, tokens = time.perf_counter(), None, 0
        async for out in aeng.generate(ids, params):
            if first is None and out.text:
                first = time.perf_counter()
            tokens = out.num_output_tokens
        return start, first, time.perf_counter(), tokens

    async def clients() -> None:
        try:
            await one(texts[0])
            timing, wall = await run_clients(n_clients, texts, one)
            result.update(timing.summary(wall))
        finally:
            aeng.shutdown()

    thread = threading.Thread(target=loop.run_until_complete, args=(clients(),))
    thread.start()
    aeng.run_forever(loop)
    thread.join()
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--api-key")
    ap.add_argument("--out", default="bench/results/load.json")
    args = ap.parse_args(argv)

    texts = prompts(args.requests)
    http = asyncio.run(http_load(args.url, args.clients, texts, args.max_tokens, args.api_key))
    print("http      ", http, flush=True)
    inproc = engine_load(args.clients, texts, args.max_tokens)
    print("in-process", inproc, flush=True)
    ratio = http["output_tok_s"] / inproc["output_tok_s"]
    print(f"\nHTTP / in-process throughput: {ratio:.3f}")
    print("| | tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | latency p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("http", http), ("in-process", inproc)):
        print(f"| {name} | {r['output_tok_s']} | {r['ttft_ms'].get('p50')} | {r['ttft_ms'].get('p99')} | "
              f"{r['tpot_ms'].get('p50')} | {r['latency_ms'].get('p99')} | {r['errors']} |")
    results = {"http": http, "in_process": inproc, "ratios": {"http/in_process": round(ratio, 3)},
               "config": vars(args), "machine": machine()}
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
