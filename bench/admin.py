"""Adapter uploads and deletes while serving. Starts `mole-serve serve` on a temporary copy of
adapters_store (the repo's store is never written) and measures over HTTP:

- upload-to-first-served: POST /admin/adapters, then the first chat completion naming the new
  adapter returns; on the idle server and under the streaming load;
- decode throughput of `--clients` streaming clients (each names a library adapter) in a baseline
  window, then in a window where an operator uploads, serves and deletes adapters back to back:
  the ratio of the two, and the longest pause between decode steps in each (the stall an upload
  may cause, against the server's own load time of one adapter).

    python -m bench.admin --out bench/results/admin.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from mole_serve.library.store import ADAPTER_FILES, adapter_dirs

from bench.common import REPO, machine, served, write_json
from bench.throughput import TOPICS


class Operator:
    """Uploads a library adapter under new names, serves one request on each, deletes it."""

    def __init__(self, http: httpx.AsyncClient, source: Path, token: str) -> None:
        self.http, self.headers = http, {"Authorization": f"Bearer {token}"}
        self.files = [("files", (f, (source / f).read_bytes())) for f in ADAPTER_FILES]
        self.served_s: list[float] = []  # upload-to-first-served, seconds
        self.load_s: list[float] = []  # the server's own load time (in its engine thread)
        self.errors = 0

    async def cycle(self, name: str) -> None:
        start = time.perf_counter()
        r = await self.http.post("/admin/adapters", files=self.files, data={"name": name}, headers=self.headers)
        if r.status_code != 201:
            self.errors += 1
            return
        c = await self.http.post(
            "/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        )
        if c.status_code != 200:
            self.errors += 1
        self.served_s.append(time.perf_counter() - start)
        self.load_s.append(r.json()["load_s"])
        if (await self.http.delete(f"/admin/adapters/{name}", headers=self.headers)).status_code != 200:
            self.errors += 1

    def summary(self) -> dict:
        ms = lambda xs: [round(x * 1000, 1) for x in xs]  # noqa: E731
        return {
            "cycles": len(self.served_s),
            "errors": self.errors,
            "upload_to_served_ms": ms(self.served_s),
            "upload_to_served_p50_ms": round(float(np.median(self.served_s)) * 1000, 1) if self.served_s else None,
            "load_ms": ms(self.load_s),
        }


async def stream_clients(
    http: httpx.AsyncClient, n: int, models: list[str], max_tokens: int, stop: asyncio.Event
) -> tuple[list[float], list[int]]:
    """n clients streaming back to back until `stop`: (arrival time of every token, failed requests)."""
    stamps: list[float] = []
    errors = [0]

    async def client(i: int) -> None:
        k = 0
        while not stop.is_set():
            body = {
                "model": models[(i + k) % len(models)],
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": True,
                "messages": [{"role": "user", "content": f"Write about {TOPICS[i % 16]}."}],
            }
            k += 1
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        errors[0] += 1
                        continue
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                            stamps.append(time.perf_counter())
            except httpx.HTTPError:
                errors[0] += 1

    await asyncio.gather(*(client(i) for i in range(n)))
    return stamps, errors


def window(stamps: list[float], start: float, end: float) -> dict:
    """Tokens/s in [start, end) and the pauses between decode steps (gaps between arrivals)."""
    ts = np.sort(np.asarray([t for t in stamps if start <= t < end]))
    gaps = np.diff(ts) if len(ts) > 1 else np.zeros(1)
    steps = gaps[gaps > 0.01]  # tokens of one step arrive together; a larger gap is the next step
    pct = {q: round(float(np.percentile(steps, q)) * 1000, 1) if len(steps) else None for q in (50, 99)}
    return {
        "tok_s": round(len(ts) / (end - start), 1),
        "tokens": int(len(ts)),
        "step_gap_p50_ms": pct[50],
        "step_gap_p99_ms": pct[99],
        "step_gap_max_ms": round(float(gaps.max()) * 1000, 1),
    }


class ForeignCPU:
    """CPU seconds the machine spent outside `pids` (other jobs disturbing the measurement), /proc."""

    def __init__(self, pids: list[int]) -> None:
        self.pids, self.tick = pids, os.sysconf("SC_CLK_TCK")
        self.start = self._read()

    def _read(self) -> float:
        try:
            fields = Path("/proc/stat").read_text().split()[1:9]  # user nice system idle iowait irq softirq steal
            total = sum(int(x) for i, x in enumerate(fields) if i not in (3, 4))  # idle and iowait use no CPU
            ours = sum(
                sum(int(x) for x in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[11:15])
                for p in self.pids
            )  # utime, stime, cutime, cstime
        except OSError:
            return float("nan")
        return (total - ours) / self.tick

    def seconds(self) -> float:
        return round(self._read() - self.start, 1)


async def measure(url: str, token: str, args: argparse.Namespace, library: list[str], server_pid: int) -> dict:
    """Idle upload cycles, then the streaming load with `rounds` pairs of windows (baseline, uploads)
    alternating, so a disturbance from outside hits one pair, not the comparison."""
    source = REPO / "adapters_store" / args.source
    limits = httpx.Limits(max_connections=args.clients + 8)
    foreign = ForeignCPU([server_pid, os.getpid()])
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        idle = Operator(http, source, token)
        await idle.cycle("bench-cold")  # the first upload warms code paths up: reported apart
        cold_ms = idle.summary()["upload_to_served_ms"]
        idle = Operator(http, source, token)
        for i in range(args.idle_uploads):
            await idle.cycle(f"bench-idle-{i}")
        stop, busy = asyncio.Event(), Operator(http, source, token)
        load = asyncio.create_task(stream_clients(http, args.clients, library, args.max_tokens, stop))
        await asyncio.sleep(args.warmup)
        pairs, i = [], 0
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            await asyncio.sleep(args.window)
            t1 = time.perf_counter()
            while time.perf_counter() - t1 < args.window:
                await busy.cycle(f"bench-busy-{i}")
                i += 1
            pairs.append((t0, t1, time.perf_counter()))
        stop.set()
        stamps, errors = await load
    rounds = [{"baseline": window(stamps, a, b), "during_uploads": window(stamps, b, c)} for a, b, c in pairs]
    ratios = [r["during_uploads"]["tok_s"] / max(r["baseline"]["tok_s"], 1e-9) for r in rounds]
    return {
        "first_upload_to_served_ms": cold_ms,
        "idle": idle.summary(),
        "under_load": busy.summary(),
        "rounds": rounds,
        "stream_errors": errors[0],
        "foreign_cpu_s": foreign.seconds(),
        "ratios": {
            "decode_during/baseline_median": round(float(np.median(ratios)), 3),
            "per_round": [round(r, 3) for r in ratios],
        },
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--idle-uploads", type=int, default=5)
    ap.add_argument("--warmup", type=float, default=10, help="seconds of load before the first window")
    ap.add_argument("--window", type=float, default=10, help="seconds of each measured window")
    ap.add_argument("--rounds", type=int, default=3, help="pairs of windows: baseline, then uploads")
    ap.add_argument("--source", default="caesar_shift", help="library adapter uploaded under new names")
    ap.add_argument("--out", default="bench/results/admin.json")
    args = ap.parse_args(argv)

    token = secrets.token_hex(8)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` still stops the server below
    with tempfile.TemporaryDirectory(prefix="mole-bench-admin-") as tmp:
        store = Path(tmp) / "store"
        shutil.copytree(REPO / "adapters_store", store)
        library = [n for n in adapter_dirs(store) if n != args.source]
        shutil.rmtree(store / args.source)
        env = {"MOLE_ADMIN_TOKEN": token, "MOLE_ADAPTERS_DIR": str(store)}
        with served(env, Path(tmp) / "server.log") as (url, pid):
            results = asyncio.run(measure(url, token, args, library, pid))
    idle, busy = results["idle"], results["under_load"]
    print(
        f"upload-to-first-served: first {results['first_upload_to_served_ms'][0]} ms; idle p50 "
        f"{idle['upload_to_served_p50_ms']} ms {idle['upload_to_served_ms']}; under load p50 "
        f"{busy['upload_to_served_p50_ms']} ms ({busy['cycles']} upload/serve/delete cycles)"
    )
    print(
        f"server load time of one adapter (engine thread): idle {idle['load_ms']} ms, under load max "
        f"{max(busy['load_ms'] or [0])} ms"
    )
    print("| round | window | tok/s | step gap p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(results["rounds"]):
        for name, w in r.items():
            print(
                f"| {i} | {name} | {w['tok_s']} | {w['step_gap_p50_ms']} | {w['step_gap_p99_ms']} | "
                f"{w['step_gap_max_ms']} |"
            )
    print(
        f"\ndecode during/baseline: median {results['ratios']['decode_during/baseline_median']} "
        f"{results['ratios']['per_round']}; failed stream requests {results['stream_errors']}, admin errors "
        f"{idle['errors'] + busy['errors']}; CPU used by other processes meanwhile {results['foreign_cpu_s']} s"
    )
    results.update(config=vars(args), machine=machine())
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
