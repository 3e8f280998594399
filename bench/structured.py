"""Structured outputs: what a grammar costs. First the two grammar libraries side by side on
SmolLM2's tokenizer (time until a new schema's first mask, time per token's mask), then the
engine's decode throughput with every request under a JSON schema against the same batch free.

    python -m bench.structured --out bench/results/structured.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from mole_serve.api.protocol import Tool
from mole_serve.api.structured import calls_schema, json_grammar
from mole_serve.compose import build
from mole_serve.config import Settings

from bench.common import machine, write_json
from bench.throughput import make_prompts, run_engine

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
    },
    "required": ["name", "age", "tags", "city"],
    "additionalProperties": False,
}
WEATHER = Tool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    }
)
CASES = {  # (schema, a text valid under it, token by token)
    "person": (PERSON, {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"], "city": "Rome"}),
    "tool_calls": (
        calls_schema([WEATHER], parallel=True),
        [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}],
    ),
}
# A story of at least 4000 characters: no request can finish early, so both runs decode the same tokens.
LONG = {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}}, "required": ["story"]}


def llguidance_masks(tokenizer, vocab: int, schema: dict, ids: list[int]) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.hf
    import torch

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    bitmask = torch.empty(1, (vocab + 31) // 32, dtype=torch.int32)
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, json_grammar(schema))
    matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.shape[1] * 4)
    first = time.perf_counter() - start
    per_token = []
    for token in ids:
        assert matcher.consume_token(token), matcher.get_error()
        start = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.shape[1] * 4)
        per_token.append(time.perf_counter() - start)
    return first, per_token


def xgrammar_masks(tokenizer, vocab: int, schema: dict, ids: list[int]) -> tuple[float, list[float]]:
    import xgrammar

    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab))
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    start = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
    matcher.fill_next_token_bitmask(bitmask, 0)
    first = time.perf_counter() - start
    per_token = []
    for token in ids:
        assert matcher.accept_token(token)
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        per_token.append(time.perf_counter() - start)
    return first, per_token


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="the best round counts")
    ap.add_argument("--out", default="bench/results/structured.json")
    args = ap.parse_args(argv)

    settings = Settings(max_num_seqs=args.requests, max_model_len=512, max_prefill_tokens=2048)
    engine = build(settings, retrieval=False, load_store=False).engine
    tokenizer, vocab = engine.tokenizer, engine.model.config.vocab_size
    results: dict = {"machine": machine(), "masks": {}}
    for case, (schema, value) in CASES.items():
        ids = tokenizer(json.dumps(value))["input_ids"]
        for name, measure in (("llguidance", llguidance_masks), ("xgrammar", xgrammar_masks)):
            first, per_token = measure(tokenizer, vocab, schema, ids)
            row = {
                "first_mask_ms": round(first * 1e3, 2),
                "mask_us_mean": round(float(np.mean(per_token)) * 1e6, 1),
                "mask_us_p99": round(float(np.percentile(per_token, 99)) * 1e6, 1),
                "tokens": len(ids),
            }
            results["masks"][f"{case}/{name}"] = row
            print(f"{case:>10} {name:>10}: {row}", flush=True)

    prompts = make_prompts(tokenizer, args.requests)
    sets = [()] * args.requests
    grammar = json_grammar(LONG)
    best: dict[str, tuple[float, float, float]] = {}
    for _ in range(args.rounds):  # interleaved: this shared machine's speed drifts between minutes
        for kind, g in (("free", None), ("json_schema", grammar)):
            run = run_engine(engine, prompts, sets, args.max_tokens, grammar=g)
            best[kind] = max(best.get(kind, run), run)
    for kind, (decode, e2e, _) in best.items():
        results[f"{kind}_tok_s"] = round(decode, 1)
        print(f"{kind:>12}: decode {decode:7.1f} tok/s   end-to-end {e2e:7.1f} tok/s", flush=True)
    results["json_schema/free"] = round(best["json_schema"][0] / best["free"][0], 3)
    print(f"json_schema/free decode {results['json_schema/free']}")
    results["command"] = f"python -m bench.structured --requests {args.requests} --max-tokens {args.max_tokens}"
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
