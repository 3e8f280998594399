"""Ray Serve scale-out (server/deploy.py): adapter loads per 1,000 requests and throughput with
adapter-affinity routing (multiplexed model id) vs Ray's plain power-of-two routing, and with 1 vs
2 replicas, on a small random Llama (hidden 256, 4 layers) so the routing, not the model, is what
is measured. Traffic: named adapters drawn Zipf(s) over the library, `concurrency` clients at once.

Ray listens on every interface: run it in its own network namespace,
    unshare -n bash -c 'ip link set lo up && python -m bench.scaleout'
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import ray
import torch
from ray import serve
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bench.common import machine, synthetic_adapter, write_json
from server.config import Settings
from server.deploy import APP_NAME, ENGINE_NAME, build_app
from server.engine.engine import LLMEngine
from server.engine.loader import resolve_base_model
from server.engine.model import DecoderModel

PORT = 8766


def library(root: Path, adapters: int) -> Path:
    """A small random base model folder beside a store of `adapters` random rank-8 LoRAs."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(resolve_base_model(Settings())).save_pretrained(root / "base")
    spec = DecoderModel(hf.config, hf.state_dict(), torch.device("cpu"), torch.float32).lora_spec()
    for i in range(adapters):
        folder = synthetic_adapter(root / "store" / f"a{i:03d}", spec, rank=8, seed=i)
        (folder / "card.json").write_text(json.dumps({"name": f"a{i:03d}", "examples": [f"task {i} {j}"
                                                                                       for j in range(5)]}))
    return root


def traffic(adapters: int, requests: int, zipf: float, seed: int = 0) -> list[str]:
    ranks = np.arange(1, adapters + 1)
    p = ranks ** -zipf / (ranks ** -zipf).sum()
    return [f"a{i:03d}" for i in np.random.default_rng(seed).choice(adapters, requests, p=p)]


def total_loads(engine) -> int:
    return sum(s.adapter_loads for _, s, _ in engine.broadcast("stats").results())


def measure(settings: Settings, replicas: int, affinity: bool, warmup: list[str], names: list[str],
            concurrency: int, max_tokens: int) -> dict:
    serve.run(build_app(settings, replicas, replica_cpus=0.5, affinity=affinity), name=APP_NAME, route_prefix="/")
    engine = serve.get_deployment_handle(ENGINE_NAME, APP_NAME)
    url = f"http://127.0.0.1:{PORT}/v1/completions"
    with httpx.Client(timeout=120) as client:
        def ask(name: str) -> None:
            r = client.post(url, json={"model": name, "prompt": "hello there", "max_tokens": max_tokens,
                                       "temperature": 0, "ignore_eos": True})
            r.raise_for_status()

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(ask, warmup))  # the same traffic, other draws: the slots' first loads are not counted
            loads = total_loads(engine)
            start = time.perf_counter()
            list(pool.map(ask, names))
            seconds = time.perf_counter() - start
        loads = total_loads(engine) - loads
    serve.delete(APP_NAME)
    return {"replicas": replicas, "routing": "affinity" if affinity else "power-of-two",
            "loads_per_1000": round(1000 * loads / len(names), 1), "requests_per_s": round(len(names) / seconds, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--warmup", type=int, default=200, help="requests before the measured ones")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--max-loras", type=int, default=8, help="device slots per replica")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--out", default="bench/results/scaleout.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = library(Path(tempfile.mkdtemp(prefix="scaleout-")), args.adapters)
    settings = Settings(base_model=str(root / "base"), adapters_dir=root / "store", max_model_len=256,
                        max_loras=args.max_loras, max_cpu_loras=args.adapters, host="127.0.0.1", port=PORT)
    LLMEngine.from_settings(settings)  # fail here, not in a replica, on a bad model folder
    names = traffic(args.adapters, args.requests, args.zipf)
    warmup = traffic(args.adapters, args.warmup, args.zipf, seed=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    try:
        rows = [measure(settings, r, a, warmup, names, args.concurrency, args.max_tokens)
                for r, a in ((2, True), (2, False), (1, True))]
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"{'replicas':>8} {'routing':>13} {'loads/1000':>10} {'req/s':>7}")
    for row in rows:
        print(f"{row['replicas']:>8} {row['routing']:>13} {row['loads_per_1000']:>10} {row['requests_per_s']:>7}")
    write_json(args.out, {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
