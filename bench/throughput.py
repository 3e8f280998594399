"""Decode throughput of the engine with heterogeneous multi-LoRA batches, against the base model
alone, transformers `generate`, PEFT's mixed-adapter batch, and the `mixlora` package's `generate`
(the MixLoRA authors' inference), all in this process.

    python -m bench.throughput --requests 32 --max-tokens 64 --out bench/results/throughput.json
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from mole_serve.compose import build
from mole_serve.config import Settings
from mole_serve.engine.engine import LLMEngine
from mole_serve.engine.request import SamplingParams
from mole_serve.library.store import GATE_DIR
from mole_serve.lora.gate import GateConfig, MoLEGate
from mole_serve.routing.types import AdapterRef, Selection

from bench.common import machine, synthetic_adapter, synthetic_moe_adapter, write_json
from bench.random_base import MARKER

TOPICS = [
    "the ocean",
    "a lighthouse",
    "mountains",
    "a robot",
    "coffee",
    "the moon",
    "a library",
    "trains",
    "winter",
    "a garden",
    "bees",
    "a violin",
    "deserts",
    "a detective",
    "volcanoes",
    "a bakery",
]


SAMPLING = ("sampled", "penalized")  # scenarios of the base model that differ in their sampling only
LOGIT_BIAS = 50  # tokens each `penalized` request biases


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]} (#{i})."}]
        prompts.append(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
    return prompts


def adapter_sets(kind: str, n: int, pool: list[str], rng: random.Random) -> list[tuple[AdapterRef, ...]]:
    if kind in ("base", *SAMPLING):
        return [()] * n
    if kind.startswith("melora"):
        return [(AdapterRef(f"melora{i:03d}"),) for i in range(n)]
    if kind in ("mixlora", "moelora"):
        return [(AdapterRef(kind),)] * n
    if kind == "mixed_kinds":  # round robin over plain, gate3 (see main), MixLoRA, MoELoRA, MELoRA
        hetero3 = adapter_sets("hetero3", n, pool, rng)
        return [
            [
                (AdapterRef(pool[i]),),
                hetero3[i],
                (AdapterRef("mixlora"),),
                (AdapterRef("moelora"),),
                (AdapterRef(f"melora{i:03d}"),),
            ][i % 5]
            for i in range(n)
        ]
    if kind == "identical":
        return [(AdapterRef(pool[0]),)] * n
    if kind == "hetero1":
        return [(AdapterRef(pool[i]),) for i in range(n)]
    if kind == "hetero3":
        picks = [rng.sample(pool, 3) for _ in range(n)]
    else:  # skewed3: Zipf(1.1) popularity over the pool, as real traffic is
        p = 1.0 / np.arange(1, len(pool) + 1) ** 1.1
        nprng = np.random.default_rng(rng.randrange(1 << 30))
        picks = [list(nprng.choice(pool, size=3, replace=False, p=p / p.sum())) for _ in range(n)]
    sets = []
    for names in picks:
        w = [rng.random() + 0.1 for _ in names]
        sets.append(tuple(AdapterRef(name, x / sum(w)) for name, x in zip(names, w)))
    return sets


def sampling_fields(kind: str, n: int, max_tokens: int, vocab: int, rng: random.Random) -> list[dict]:
    """Per request, the SamplingParams fields of a sampling scenario (greedy otherwise): `sampled`
    draws with temperature, top-k and top-p; `penalized` adds frequency, presence and repetition
    penalties, a logit_bias of LOGIT_BIAS tokens, and min_tokens over two stop_token_ids for the
    whole output (the mask runs every step)."""
    if kind not in SAMPLING:
        return [{}] * n
    fields = [{"temperature": 0.8, "top_k": 50, "top_p": 0.95, "seed": i} for i in range(n)]
    if kind == "penalized":
        for f in fields:
            bias = {t: rng.uniform(-5, 5) for t in rng.sample(range(vocab), LOGIT_BIAS)}
            f.update(
                frequency_penalty=0.5,
                presence_penalty=0.3,
                repetition_penalty=1.1,
                logit_bias=tuple(bias.items()),
                min_tokens=max_tokens,
                stop_token_ids=tuple(rng.sample(range(vocab), 2)),
            )
    return fields


def run_engine(
    engine: LLMEngine,
    prompts,
    sets,
    max_tokens: int,
    gated: bool = False,
    grammar: str | None = None,
    sampling: list[dict] | None = None,
) -> tuple[float, float, float]:
    """(decode tokens/s, end-to-end tokens/s, MB of distinct adapter weights one decode step reads).
    Decode = the steps after every prompt is prefilled: each sequence adds one token per step.
    gated: each set of more than one adapter is the request's candidates, weighted per layer and
    token by the gate. grammar: every request's output constrained by it. sampling: per request,
    SamplingParams fields (sampling_fields; none: greedy)."""
    params = [
        SamplingParams(max_tokens=max_tokens, ignore_eos=True, grammar=grammar, **fields)
        for fields in sampling or [{}] * len(prompts)
    ]
    selections = [Selection("gate", s) if gated and len(s) > 1 else None for s in sets]
    plain = [() if sel else s for s, sel in zip(sets, selections)]
    engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), plain, selections)  # warm-up: resident
    seqs = [engine.add_request(p, sp, s, None, sel) for p, sp, s, sel in zip(prompts, params, plain, selections)]
    start = time.perf_counter()
    decode_start, decode_tokens, distinct = None, 0, []
    while engine.has_unfinished():
        in_decode = not engine.scheduler.waiting and all(s.num_uncomputed == 1 for s in engine.scheduler.running)
        if in_decode and decode_start is None:
            decode_start = time.perf_counter()
        distinct.append(len({a.name for seq in engine.scheduler.running for a in seq.adapters}))
        outputs = engine.step().outputs
        if decode_start is not None:
            decode_tokens += len(outputs)
    end = time.perf_counter()
    total = sum(len(s.output_ids) for s in seqs)
    return decode_tokens / (end - decode_start), total / (end - start), max(distinct) * engine.pool.slot_bytes / 1e6


def run_hf(
    model_path: Path,
    tokenizer,
    prompts,
    max_tokens: int,
    adapter_paths: list[Path] | None,
    mixlora_path: Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """transformers generate (+ PEFT mixed adapters, or the `mixlora` package's injected MixLoRA) on
    the engine's device and dtype: (decode tokens/s, end-to-end tokens/s)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    kwargs = {}
    if mixlora_path:
        from mixlora import inject_adapter_in_model, load_adapter_weights

        config, weights = load_adapter_weights(str(mixlora_path), device=device, dtype=dtype)
        inject_adapter_in_model(model, config, weights)
        model.eval()  # its dropout off, as a user serving it would (the experts sit in plain dicts)
        for layer in model.model.layers:
            for moe in layer.mlp.mixlora_moes.values():
                for expert in moe.experts_.values():
                    expert.eval()
    if adapter_paths:
        model = PeftModel.from_pretrained(model, adapter_paths[0], adapter_name="a0")
        for i, p in enumerate(adapter_paths[1:], start=1):
            model.load_adapter(p, adapter_name=f"a{i}")
        kwargs["adapter_names"] = [f"a{i}" for i in range(len(prompts))]
    tokenizer.padding_side = "left"
    texts = [tokenizer.decode(p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    gen = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)

    def timed(new_tokens: int) -> float:
        start = time.perf_counter()
        out = model.generate(**enc, **{**gen, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}, **kwargs)
        assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.inference_mode():
        timed(4)  # warm-up
        prefill, full = timed(1), timed(max_tokens)
    n = len(prompts)
    # Decode rate: the tokens after the first, over the time beyond a prefill-plus-one-token run.
    return n * (max_tokens - 1) / (full - prefill), n * max_tokens / full


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--pool", type=int, default=64, help="adapters in the library for hetero3/skewed3")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over our scenarios; the best counts")
    ap.add_argument("--skip-hf", action="store_true", help="skip the transformers/PEFT baselines")
    ap.add_argument("--scenarios", nargs="+", help="run only these of our scenarios (base always runs)")
    ap.add_argument(
        "--eager-too",
        action="store_true",
        help="CUDA: run the scenarios again with the decode step's CUDA graphs off, as <scenario>_eager",
    )
    ap.add_argument("--out", default="bench/results/throughput.json")
    args = ap.parse_args(argv)

    # prefix caching off: every scenario prefills its prompts as the first did (bench.load measures the cache)
    settings = Settings(
        device=args.device,
        max_num_seqs=args.requests,
        max_model_len=512,
        max_prefill_tokens=2048,
        max_loras=args.pool,
        max_cpu_loras=args.pool,
        enable_prefix_caching=False,
    )
    built = build(settings, retrieval=False, load_store=False)
    engine = built.engine
    from mole_serve.engine.loader import resolve_base_model

    model_path = resolve_base_model(settings)
    prompts = make_prompts(engine.tokenizer, args.requests)
    tmp = Path(tempfile.mkdtemp(prefix="mole-bench-"))
    names = [f"lora{i:03d}" for i in range(args.pool)]
    paths = [synthetic_adapter(tmp / n, engine.model.lora_spec(), args.rank, seed=i) for i, n in enumerate(names)]
    for n, p in zip(names, paths):
        built.add_adapter(n, p)
    # MELoRAs of the same equivalent rank as the LoRAs: n=8 mini LoRAs of rank rank/8 (1/8 the parameters)
    for i in range(args.requests):
        built.add_adapter(
            f"melora{i:03d}",
            synthetic_adapter(
                tmp / f"melora{i:03d}", engine.model.lora_spec(), max(1, args.rank // 8), seed=1000 + i, blocks=8
            ),
        )
    # The MoE kinds as the issue sizes them: 8 experts, top-2, rank 8 on all 7 projections
    moe_paths = {
        kind: synthetic_moe_adapter(tmp / kind, engine.model.lora_spec(), kind, 8, 2, args.rank, seed=7)
        for kind in ("mixlora", "moelora")
    }
    for kind, path in moe_paths.items():
        built.add_adapter(kind, path)
    gate_dir = Path(settings.adapters_dir) / GATE_DIR
    if gate_dir.is_dir():
        built.load_gate(gate_dir)
    else:  # an untrained router costs the same as a trained one
        engine.pool.attach_gate(MoLEGate(GateConfig.for_base(engine.model_name, engine.model.lora_spec())))

    # One full-length run first: the KV cache's pages are committed on first touch, which must not
    # be charged to whichever scenario happens to run first.
    engine.generate(prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
    rng = random.Random(0)
    results: dict = {"e2e_tok_s": {}, "adapter_mb_per_step": {}}

    def record(key: str, decode: float, e2e: float) -> None:
        results[f"{key}_tok_s"], results["e2e_tok_s"][key] = round(decode, 1), round(e2e, 1)
        print(f"{key:>10}: decode {decode:7.1f} tok/s   end-to-end {e2e:7.1f} tok/s", flush=True)

    kinds = [
        "base",
        "identical",
        "hetero1",
        "hetero3",
        "skewed3",
        "gate3",
        "melora",
        "melora_dense",
        "mixlora",
        "moelora",
        "mixed_kinds",
        *SAMPLING,
    ]
    chosen = set(args.scenarios or kinds) | {"base"}  # base always runs, and sampled with penalized (its baseline)
    if "penalized" in chosen:
        chosen.add("sampled")
    kinds = [k for k in kinds if k in chosen]
    sets = {kind: adapter_sets(kind, args.requests, names, rng) for kind in kinds if kind != "gate3"}
    sets["gate3"] = sets.get("hetero3") or adapter_sets("hetero3", args.requests, names, rng)  # the gate weighs them
    vocab = engine.model.config.vocab_size
    sampling = {kind: sampling_fields(kind, args.requests, args.max_tokens, vocab, rng) for kind in kinds}
    # Rounds interleave the scenarios and the best round counts: this shared 2-core machine's
    # speed drifts by 10-20% between minutes, which would otherwise land on one scenario.
    best: dict[str, tuple[float, float, float]] = {}
    for _ in range(args.rounds):
        for kind in kinds:
            engine.runner.native_blocks = kind != "melora_dense"  # melora_dense: the blockdiag LoRA form
            gated = kind in ("gate3", "mixed_kinds")
            run = run_engine(engine, prompts, sets[kind], args.max_tokens, gated, sampling=sampling[kind])
            best[kind] = max(best.get(kind, run), run)
    static = engine.runner.static
    if args.eager_too and static is not None and static.cuda_graphs:
        engine.runner.static = None  # every step launches its ops one by one
        for kind in kinds:
            engine.runner.native_blocks = kind != "melora_dense"
            gated = kind in ("gate3", "mixed_kinds")
            run = run_engine(engine, prompts, sets[kind], args.max_tokens, gated, sampling=sampling[kind])
            best[f"{kind}_eager"] = run
        engine.runner.static = static
        kinds += [f"{kind}_eager" for kind in kinds]
    for kind in kinds:
        decode, e2e, mb = best[kind]
        record(kind, decode, e2e)
        if kind.startswith(("hetero", "skewed", "gate")):
            results["adapter_mb_per_step"][kind] = round(mb, 1)
    if not args.skip_hf:
        hf = dict(device=args.device, dtype=engine.model.dtype)
        record(
            "hf_base",
            *max(
                run_hf(model_path, engine.tokenizer, prompts, args.max_tokens, None, **hf) for _ in range(args.rounds)
            ),
        )
        record(
            "peft_mixed", *run_hf(model_path, engine.tokenizer, prompts, args.max_tokens, paths[: args.requests], **hf)
        )
        if importlib.util.find_spec("mixlora"):  # not on the GPU machine's image
            record(
                "mixlora_ref",
                *run_hf(model_path, engine.tokenizer, prompts, args.max_tokens, None, moe_paths["mixlora"], **hf),
            )

    pairs = [
        *((k, "base") for k in ["identical", "hetero1", "hetero3", "skewed3"]),
        ("gate3", "hetero3"),
        ("melora", "hetero1"),
        ("melora", "melora_dense"),
        *((k, "base") for k in ["mixlora", "moelora", "mixed_kinds"]),
        ("sampled", "base"),
        ("penalized", "sampled"),
        ("mixlora", "mixlora_ref"),
        ("hetero1", "peft_mixed"),
        ("base", "hf_base"),
        *((k, f"{k}_eager") for k in ["base", "hetero1", "hetero3", "gate3", "mixed_kinds"]),
    ]
    ratios = {
        f"{a}/{b}": results[f"{a}_tok_s"] / results[f"{b}_tok_s"]
        for a, b in pairs
        if f"{a}_tok_s" in results and f"{b}_tok_s" in results
    }
    results["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
    results["config"] = {
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rank": args.rank,
        "rounds": args.rounds,
        "pool": args.pool,
        "dtype": str(engine.model.dtype),
        "device": args.device,
        "cuda_graphs": static is not None and static.cuda_graphs,
        "base_model": engine.model_name,
        "base_weights": "random (bench.random_base)" if (model_path / MARKER).exists() else "trained",
        "gate3": "the hetero3 candidate sets, weighted per layer and token by the "
        + ("trained gate" if gate_dir.is_dir() else "untrained gate (same cost)"),
        "melora": f"each request on its own MELoRA (8 mini LoRAs of rank {max(1, args.rank // 8)}, "
        "the same equivalent rank as hetero1's LoRAs), native blocks; melora_dense: the "
        "same as the dense blockdiag LoRA",
        "mixlora": f"every request on one MixLoRA: 8 experts, top-2, rank {args.rank} on all 7 "
        "projections; moelora: the same sizes as per-linear experts; mixlora_ref: the "
        "`mixlora` package's generate on that adapter, batch of all requests",
        "mixed_kinds": "requests round robin over a plain LoRA, gate3's gated candidates, the "
        "MixLoRA, the MoELoRA and a MELoRA",
        "sampled": "the base model, each request sampled (temperature 0.8, top_k 50, top_p 0.95, seeded)",
        "penalized": "sampled's requests with frequency 0.5, presence 0.3 and repetition 1.1 penalties, "
        f"a logit_bias of {LOGIT_BIAS} random tokens each, and min_tokens over two stop_token_ids "
        "for the whole output",
    }
    results["machine"] = machine()
    print("\n| ratio | value |\n|---|---|")
    for k, v in results["ratios"].items():
        print(f"| {k} | {v:.3f} |")
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
