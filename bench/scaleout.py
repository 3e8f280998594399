"""Ray Serve scale-out (mole_serve/deploy.py): adapter loads per 1,000 requests and throughput with
adapter-affinity routing (multiplexed model id) vs Ray's plain power-of-two routing, 1 vs 2
replicas, and 1 replica against `mole-serve serve` alone (the ingress's overhead), on a small
random Llama (hidden 256, 4 layers) so the routing, not the model, is what is measured. Traffic:
named adapters drawn Zipf(s) over the library, `concurrency` clients at once.

`--real-base --overhead-only` runs the single server and 1 replica on SmolLM2-135M instead: the
ingress's overhead where the model's time counts, as it does in real serving.

Ray listens on every interface: run it in its own network namespace,
    unshare -n bash -c 'ip link set lo up && python -m bench.scaleout'
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import ray
import torch
from mole_serve.compose import build
from mole_serve.config import Settings
from mole_serve.deploy import APP_NAME, ENGINE_NAME, build_app
from mole_serve.engine.loader import resolve_base_model
from mole_serve.engine.model import DecoderModel
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bench.common import machine, served, synthetic_adapter, write_json

PORT = 8766


def library(root: Path, adapters: int, real_base: bool) -> str:
    """A store of `adapters` random rank-8 LoRAs over SmolLM2 (real_base) or over a small random
    base model written beside it; returns the base model's path."""
    torch.manual_seed(0)
    if real_base:
        base = str(resolve_base_model(Settings()))
        hf = AutoModelForCausalLM.from_pretrained(base)
    else:
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
        hf, base = LlamaForCausalLM(config).eval(), str(root / "base")
        hf.save_pretrained(base)
        AutoTokenizer.from_pretrained(resolve_base_model(Settings())).save_pretrained(base)
    spec = DecoderModel(hf.config, hf.state_dict(), torch.device("cpu"), torch.float32).lora_spec()
    for i in range(adapters):
        folder = synthetic_adapter(root / "store" / f"a{i:03d}", spec, rank=8, seed=i)
        (folder / "card.json").write_text(
            json.dumps({"name": f"a{i:03d}", "examples": [f"task {i} {j}" for j in range(5)]})
        )
    return base


def traffic(adapters: int, requests: int, zipf: float, seed: int = 0) -> list[str]:
    ranks = np.arange(1, adapters + 1)
    p = ranks**-zipf / (ranks**-zipf).sum()
    return [f"a{i:03d}" for i in np.random.default_rng(seed).choice(adapters, requests, p=p)]


def lru_loads(seq: list[str], slots: int, skip: int) -> int:
    """Loads of one LRU pool of `slots` over seq, not counting the first `skip` requests (warm-up)."""
    pool: OrderedDict[str, None] = OrderedDict()
    loads = 0
    for i, name in enumerate(seq):
        if name in pool:
            pool.move_to_end(name)
            continue
        loads += i >= skip
        pool[name] = None
        if len(pool) > slots:
            pool.popitem(last=False)
    return loads


def belady_loads(seq: list[str], slots: int, skip: int) -> int:
    """Loads of one clairvoyant pool (evicts the adapter needed furthest ahead): no routing and no
    eviction policy over that many slots in all does better."""
    next_use, later = [len(seq)] * len(seq), {}  # index of each request's adapter's next request
    for i in range(len(seq) - 1, -1, -1):
        next_use[i] = later.get(seq[i], len(seq))
        later[seq[i]] = i
    pool: dict[str, int] = {}  # adapter -> when it is next needed
    loads = 0
    for i, name in enumerate(seq):
        if name not in pool:
            loads += i >= skip
            if len(pool) == slots:
                del pool[max(pool, key=pool.__getitem__)]
        pool[name] = next_use[i]
    return loads


def loads_bounds(warmup: list[str], names: list[str], slots: int, replicas: int) -> dict:
    """What the measured loads compare with, per 1,000 requests of the same traffic."""
    seq, skip = warmup + names, len(warmup)
    per_replica = [[n for n in seq if int(n[1:]) % replicas == r] for r in range(replicas)]
    skips = [sum(int(n[1:]) % replicas == r for n in warmup) for r in range(replicas)]
    scale = 1000 / len(names)
    return {
        "one LRU pool (a replica under plain routing)": round(scale * lru_loads(seq, slots, skip), 1),
        f"{replicas} LRU pools, adapters split between them (ideal affinity)": round(
            scale * sum(lru_loads(s, slots, k) for s, k in zip(per_replica, skips)), 1
        ),
        f"clairvoyant pool of {replicas} x {slots} slots (no routing does better)": round(
            scale * belady_loads(seq, replicas * slots, skip), 1
        ),
    }


def ray_loads(engine) -> Callable[[], int]:
    return lambda: sum(s.adapter_loads for _, s, _ in engine.broadcast("stats").results())


def scraped_loads(url: str) -> Callable[[], int]:
    def loads() -> int:
        families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        return int(next(f.samples[0].value for f in families if f.name == "mole_adapter_loads"))

    return loads


def drive(
    url: str, loads: Callable[[], int], warmup: list[str], names: list[str], concurrency: int, max_tokens: int
) -> dict:
    """The warm-up traffic, then the measured one: adapter loads per 1,000 requests and requests/s."""
    with httpx.Client(timeout=120) as client:

        def ask(name: str) -> None:
            r = client.post(
                f"{url}/v1/completions",
                json={
                    "model": name,
                    "prompt": "hello there",
                    "temperature": 0,
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                },
            )
            r.raise_for_status()

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(ask, warmup))  # the same traffic, other draws: the slots' first loads are not counted
            before = loads()
            start = time.perf_counter()
            list(pool.map(ask, names))
            seconds = time.perf_counter() - start
    return {
        "loads_per_1000": round(1000 * (loads() - before) / len(names), 1),
        "requests_per_s": round(len(names) / seconds, 2),
    }


def on_ray(settings: Settings, replicas: int, affinity: bool, *traffic_args) -> dict:
    serve.run(build_app(settings, replicas, replica_cpus=0.5, affinity=affinity), name=APP_NAME, route_prefix="/")
    row = drive(
        f"http://127.0.0.1:{PORT}", ray_loads(serve.get_deployment_handle(ENGINE_NAME, APP_NAME)), *traffic_args
    )
    serve.delete(APP_NAME)
    return {"server": "ray", "replicas": replicas, "routing": "affinity" if affinity else "power-of-two", **row}


def single_server(settings: Settings, log: Path, *traffic_args) -> dict:
    """`mole-serve serve` alone, one torch thread as a Ray replica gets: the baseline of the ingress overhead."""
    env = {
        "OMP_NUM_THREADS": "1",
        "MOLE_BASE_MODEL": settings.base_model,
        "MOLE_ADAPTERS_DIR": str(settings.adapters_dir),
        "MOLE_MAX_MODEL_LEN": str(settings.max_model_len),
        "MOLE_MAX_LORAS": str(settings.max_loras),
        "MOLE_MAX_CPU_LORAS": str(settings.max_cpu_loras),
    }
    with served(env, log) as (url, _):
        return {"server": "single", "replicas": 1, "routing": "-", **drive(url, scraped_loads(url), *traffic_args)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--warmup", type=int, default=200, help="requests before the measured ones")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--max-loras", type=int, default=8, help="device slots per replica")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument(
        "--real-base",
        action="store_true",
        help="SmolLM2-135M instead of the small random model (where the model's time counts)",
    )
    p.add_argument("--overhead-only", action="store_true", help="only the single server and 1 Ray replica")
    p.add_argument("--out", default="bench/results/scaleout.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="scaleout-"))
    base = library(root, args.adapters, args.real_base)
    settings = Settings(
        base_model=base,
        adapters_dir=root / "store",
        max_model_len=256,
        max_loras=args.max_loras,
        max_cpu_loras=args.adapters,
        host="127.0.0.1",
        port=PORT,
    )
    build(settings, retrieval=False, load_store=False)  # fail here, not in a replica, on a bad model folder
    names = traffic(args.adapters, args.requests, args.zipf)
    warmup = traffic(args.adapters, args.warmup, args.zipf, seed=1)
    traffic_args = (warmup, names, args.concurrency, args.max_tokens)
    rows = [single_server(settings, root / "single.log", *traffic_args)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    try:
        rows += [
            on_ray(settings, r, a, *traffic_args)
            for r, a in ([(1, True)] if args.overhead_only else [(2, True), (2, False), (1, True)])
        ]
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"{'server':>7} {'replicas':>8} {'routing':>13} {'loads/1000':>10} {'req/s':>7}")
    for row in rows:
        print(
            f"{row['server']:>7} {row['replicas']:>8} {row['routing']:>13} {row['loads_per_1000']:>10} "
            f"{row['requests_per_s']:>7}"
        )
    single, one = rows[0], rows[-1]
    ratios = {"throughput ray 1 replica/single server": round(one["requests_per_s"] / single["requests_per_s"], 3)}
    if not args.overhead_only:
        affinity, plain = rows[1], rows[2]
        ratios |= {
            "loads power-of-two/affinity (2 replicas)": round(plain["loads_per_1000"] / affinity["loads_per_1000"], 2),
            "throughput affinity/power-of-two (2 replicas)": round(
                affinity["requests_per_s"] / plain["requests_per_s"], 3
            ),
        }
    bounds = loads_bounds(warmup, names, args.max_loras, replicas=2)
    print(json.dumps({"ratios": ratios, "loads_bounds": bounds}, indent=1))
    write_json(
        args.out, {"machine": machine(), "args": vars(args), "rows": rows, "ratios": ratios, "loads_bounds": bounds}
    )


if __name__ == "__main__":
    main()
