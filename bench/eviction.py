"""Eviction policies (mole_serve/lora/eviction.py) on bench.scaleout's traffic: adapter loads per
1,000 requests of a real LoRAPool under each policy, beside the clairvoyant bound (Belady: evict
the adapter needed furthest ahead), at a few slot counts. No model and no server: the pool holds
tiny synthetic adapters, every one of them in its CPU tier, and serves one request at a time, so
a load is exactly a miss of the device slots, what serving pays a host-to-device copy for.

Traffic: `stationary` is scaleout's (Zipf over the library, its seeds and defaults: the first
`warmup` requests are not counted); `drift` is the same draws with the popularity reshuffled
halfway through the measured requests (each adapter id mapped through a random permutation), where
a frequency count has to forget what it learned.

    .venv/bin/python -m bench.eviction
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from mole_serve.lora.eviction import HALF_LIFE_PER_SLOT, PolicyName
from mole_serve.lora.kinds.base import TARGET_MODULES, AdapterWeights, LoRATargetSpec
from mole_serve.lora.pool import LoRAPool

from bench.common import machine, write_json
from bench.scaleout import belady_loads, lru_loads, traffic

POLICIES: tuple[PolicyName, ...] = ("lru", "lrfu")
SPEC = LoRATargetSpec(num_layers=1, shapes={m: (8, 8) for m in TARGET_MODULES})


def adapter(name: str) -> AdapterWeights:
    """A rank-1 LoRA on one module: residency does not look further."""
    g = torch.Generator().manual_seed(int(name[1:]))
    return AdapterWeights(
        name, rank=1, modules={(0, "q_proj"): (torch.randn(1, 8, generator=g), torch.randn(8, 1, generator=g))}
    )


def pool_loads(seq: list[str], skip: int, slots: int, policy: PolicyName, library: dict[str, AdapterWeights]) -> int:
    """Loads of a LoRAPool of `slots` slots over seq, one request at a time, not counting the first `skip`."""
    pool = LoRAPool(SPEC, slots, len(library), torch.device("cpu"), torch.float32, library.__getitem__, policy)

    def serve(names: list[str]) -> None:
        for name in names:
            pool.release(pool.acquire([name]))

    serve(seq[:skip])
    before = pool.loads
    serve(seq[skip:])
    return pool.loads - before


def drifted(names: list[str], adapters: int, seed: int = 2) -> list[str]:
    """names with the adapters' popularity reshuffled from the middle on."""
    perm = np.random.default_rng(seed).permutation(adapters)
    half = len(names) // 2
    return names[:half] + [f"a{perm[int(n[1:])]:03d}" for n in names[half:]]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=64, help="library size (bench.scaleout's default)")
    p.add_argument("--requests", type=int, default=600, help="measured requests (bench.scaleout's default)")
    p.add_argument("--warmup", type=int, default=200, help="requests before the measured ones (bench.scaleout's)")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the popularity (bench.scaleout's)")
    p.add_argument("--slots", type=int, nargs="+", default=[4, 8, 16], help="device slot counts (max_loras)")
    p.add_argument("--out", default="bench/results/eviction.json", help="JSON; the markdown table beside it")
    args = p.parse_args(argv)
    names = traffic(args.adapters, args.requests, args.zipf)
    warmup = traffic(args.adapters, args.warmup, args.zipf, seed=1)
    library = {f"a{i:03d}": adapter(f"a{i:03d}") for i in range(args.adapters)}
    scale = 1000 / len(names)
    rows = []
    for pattern, measured in (("stationary", names), ("drift", drifted(names, args.adapters))):
        seq, skip = warmup + measured, len(warmup)
        for slots in args.slots:
            loads = {policy: pool_loads(seq, skip, slots, policy, library) for policy in POLICIES}
            reference = lru_loads(seq, slots, skip)  # scaleout's pure-Python LRU: the pool's must match it
            assert loads["lru"] == reference, (pattern, slots, loads["lru"], reference)
            row = {"traffic": pattern, "slots": slots}
            row |= {policy: round(scale * n, 1) for policy, n in loads.items()}
            row["clairvoyant"] = round(scale * belady_loads(seq, slots, skip), 1)
            row["lrfu/lru"] = round(loads["lrfu"] / loads["lru"], 3)
            rows.append(row)
    header = ["traffic", "slots", *POLICIES, "clairvoyant", "lrfu/lru"]
    lines = [
        "Adapter loads per 1,000 requests (lower is better) of a LoRAPool per eviction policy, and of a",
        "clairvoyant pool of as many slots (the bound no policy beats). LRU through the pool equals",
        "bench.scaleout's `lru_loads` on the same sequence (asserted). lrfu's half-life is "
        f"{HALF_LIFE_PER_SLOT} uses per slot; `drift` reshuffles the adapters' popularity halfway through.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows),
        "",
        "    " + " ".join([".venv/bin/python -m bench.eviction", *argv]),
        "",
    ]
    print("\n".join(lines))
    write_json(args.out, {"machine": machine(), "args": vars(args), "rows": rows})
    Path(args.out).with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
