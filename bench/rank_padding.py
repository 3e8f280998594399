"""What one resident adapter of a larger rank costs every request. The pool's stacks store one rank
for all slots (mole_serve/lora/pool.py pads each slot to the largest rank resident, as vLLM's
max_lora_rank does); the ops compute each adapter at its own rank, so an unused larger adapter
should cost memory and not throughput.

Two engines in this process, the same rank-8 library and requests; the second also holds one
rank-`--big-rank` adapter that no request uses. Rounds interleave them; the best round counts.

    python -m bench.rank_padding --requests 32 --max-tokens 64 --big-rank 32
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mole_serve.compose import build
from mole_serve.config import Settings
from mole_serve.engine.request import SamplingParams
from mole_serve.routing.types import AdapterRef

from bench.common import machine, synthetic_adapter, write_json
from bench.throughput import make_prompts, run_engine


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--library", type=int, default=12, help="rank-8 adapters, the shipped library's count")
    ap.add_argument("--big-rank", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/results/rank_padding.json")
    args = ap.parse_args(argv)

    settings = Settings(
        max_num_seqs=args.requests, max_model_len=512, max_prefill_tokens=2048, enable_prefix_caching=False
    )
    tmp = Path(tempfile.mkdtemp(prefix="mole-rank-"))
    built = {kind: build(settings, retrieval=False, load_store=False) for kind in ("rank8", "padded")}
    engines = {kind: b.engine for kind, b in built.items()}
    spec = engines["rank8"].model.lora_spec()
    names = [f"lora{i:02d}" for i in range(args.library)]
    for i, name in enumerate(names):
        path = synthetic_adapter(tmp / name, spec, 8, seed=i)
        for b in built.values():
            b.add_adapter(name, path)
    padded = engines["padded"]
    built["padded"].add_adapter("big", synthetic_adapter(tmp / "big", spec, args.big_rank, seed=99))
    prompts = make_prompts(padded.tokenizer, args.requests)
    # One request on the big adapter makes it resident: the pool grows to its rank and stays there.
    padded.generate(prompts[:1], SamplingParams(max_tokens=2), [(AdapterRef("big"),)])
    for engine in engines.values():  # KV pages committed before any timing
        engine.generate(prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))

    library = [(AdapterRef(names[i % len(names)]),) for i in range(args.requests)]  # each request one adapter
    runs = {
        "base": (engines["rank8"], [()] * args.requests),
        "rank8": (engines["rank8"], library),
        "padded": (padded, library),
    }
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for key, (engine, sets) in runs.items():
            best[key] = max(best.get(key, 0.0), run_engine(engine, prompts, sets, args.max_tokens)[0])
    assert padded.pool.rank == args.big_rank and engines["rank8"].pool.rank == 8
    results = {f"{key}_tok_s": round(v, 1) for key, v in best.items()}
    results["ratios"] = {
        "padded/rank8": round(best["padded"] / best["rank8"], 3),
        "rank8/base": round(best["rank8"] / best["base"], 3),
        "padded/base": round(best["padded"] / best["base"], 3),
    }
    results["config"] = {
        **vars(args),
        "scenario": "each request on one of the library's rank-8 adapters, round "
        "robin; padded: the same with a rank-big_rank adapter resident that no request uses",
        "slot_mb": {k: round(e.pool.slot_bytes / 1e6, 2) for k, e in engines.items()},
    }
    results["machine"] = machine()
    for key, v in best.items():
        print(f"{key:>7}: decode {v:7.1f} tok/s")
    print(results["ratios"])
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
