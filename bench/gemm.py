"""The base model's projections at decode and prefill sizes: our `Linear` (weights packed once for
the device's GEMM) against F.linear, the call transformers makes, in this process.

    python -m bench.gemm --out bench/results/gemm.json
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from mole_serve.engine.model import Linear

from bench.common import machine, timed, write_json

# SmolLM2-135M's fused projections and LM head: (name, d_out, d_in)
SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("lm_head", 49152, 576)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 512], help="M: decode batch, prefill chunk")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per case; the p50 counts")
    ap.add_argument("--out", default="bench/results/gemm.json")
    args = ap.parse_args(argv)
    results = []
    print(f"{'shape':>8} {'M':>5} {'F.linear ms':>12} {'Linear ms':>10} {'speedup':>8}")
    with torch.inference_mode():
        for name, d_out, d_in in SHAPES:
            weight = torch.randn(d_out, d_in)
            ours = Linear(weight)
            for m in args.rows:
                x = torch.randn(m, d_in)
                torch.testing.assert_close(ours(x), F.linear(x, weight), rtol=1e-4, atol=1e-3)
                ref = timed(lambda _, x=x, w=weight: F.linear(x, w), args.repeats)["p50_ms"]
                packed = timed(lambda _, x=x, f=ours: f(x), args.repeats)["p50_ms"]
                results.append(
                    {
                        "shape": name,
                        "m": m,
                        "f_linear_ms": round(ref, 3),
                        "linear_ms": round(packed, 3),
                        "speedup": round(ref / packed, 2),
                    }
                )
                print(f"{name:>8} {m:>5} {ref:12.3f} {packed:10.3f} {ref / packed:8.2f}x", flush=True)
    payload = {"results": results, "packed": ours.packed is not None, "machine": machine()}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
