"""Decode speed at a large model's shape against the memory-bandwidth bound of the step.

A random-weight model of Llama-3-8B's dimensions is built directly on the device (decode speed does
not depend on the weights' values; 16 GB of bf16 weights would not travel), served by the engine
with the shipped tokenizer, and decodes the base alone and hetero1 (each request its own rank-8
LoRA on all projections) at each batch size. A decode step must read every weight once and each
row's KV cache, so its time is at least

    (weight bytes + KV bytes read) / copy bandwidth

with the bandwidth measured here by a large device-to-device copy. `fraction_of_bound` is that
bound over the measured step time (1.0: the step runs at the memory's speed).

    python -m bench.decode_bound --device cuda --batches 32 64 --out bench/results/decode_bound_cuda.json
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from mole_serve.compose import build
from mole_serve.config import Settings
from mole_serve.engine.model import DecoderModel, Linear
from mole_serve.routing.types import AdapterRef
from transformers import AutoTokenizer, LlamaConfig

from bench.common import machine, synthetic_adapter, write_json
from bench.throughput import run_engine

# Meta-Llama-3-8B's config.json, less what decode speed does not depend on
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def random_model(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> DecoderModel:
    """Weights N(0, 0.02) drawn on the device, in the checkpoint's names (what DecoderModel reads)."""
    d, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "lm_head.weight": (config.vocab_size, d)}
    shapes["model.norm.weight"] = (d,)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (inter, d),
            p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
        }
    g = torch.Generator(device).manual_seed(0)
    state = {k: torch.randn(s, generator=g, device=device, dtype=dtype) * 0.02 for k, s in shapes.items()}
    return DecoderModel(config, state, device, dtype)


def copy_bandwidth(device: torch.device, iters: int = 10) -> float:
    """Bytes per second the device's memory moves: a copy reads and writes each byte."""
    nbytes = 1 << (30 if device.type == "cuda" else 27)  # past every cache
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    return 2 * nbytes * iters / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every width and the depth (CPU rehearsal)")
    ap.add_argument("--out", default="bench/results/decode_bound_cuda.json")
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), torch.bfloat16 if args.device == "cuda" else torch.float32
    shape = dict(LLAMA3_8B)
    if args.scale != 1.0:
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
            shape[key] = max(2, int(shape[key] * args.scale) // 64 * 64 or 2)
    config = LlamaConfig(**shape)
    largest = max(args.batches)
    settings = Settings(
        device=args.device,
        dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
        max_num_seqs=largest,
        max_model_len=args.prompt_len + args.max_tokens + 16,
        max_prefill_tokens=4096,
        max_loras=largest,
        max_cpu_loras=largest,
        enable_prefix_caching=False,
    )
    from mole_serve.engine.loader import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(settings))  # ids only: any tokenizer serves
    model = random_model(config, device, dtype)
    built = build(settings, retrieval=False, load_store=False, model=model, tokenizer=tokenizer)
    engine = built.engine
    tmp = Path(tempfile.mkdtemp(prefix="mole-bound-"))
    names = [f"lora{i:03d}" for i in range(largest)]
    for i, name in enumerate(names):
        built.add_adapter(name, synthetic_adapter(tmp / name, model.lora_spec(), args.rank, seed=i))
    rng = random.Random(0)
    vocab = min(config.vocab_size, len(tokenizer))
    weight_bytes = sum(t.numel() * t.element_size() for t in _weights(model))
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize
    bandwidth = copy_bandwidth(device)
    results: dict = {
        "shape": {k: v for k, v in shape.items() if k != "tie_word_embeddings"},
        "weights": "random N(0, 0.02), built on the device",
        "dtype": str(dtype),
        "cuda_graphs": engine.runner.static is not None and engine.runner.static.cuda_graphs,
        "weight_gb": round(weight_bytes / 1e9, 2),
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "runs": {},
    }
    for batch in args.batches:
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(batch)]
        for kind, sets in (("base", [()] * batch), ("hetero1", [(AdapterRef(n),) for n in names[:batch]])):
            decode, _, _ = run_engine(engine, prompts, sets, args.max_tokens)
            step_s = batch / decode
            # each row reads its whole context once per step: the prompt and, on average, half the output
            kv_bytes = batch * (args.prompt_len + args.max_tokens / 2) * kv_per_token
            bound_s = (weight_bytes + kv_bytes) / bandwidth
            results["runs"][f"{kind}_b{batch}"] = {
                "decode_tok_s": round(decode, 1),
                "step_ms": round(step_s * 1e3, 3),
                "bound_ms": round(bound_s * 1e3, 3),
                "fraction_of_bound": round(bound_s / step_s, 3),
            }
            print(f"{kind:>8} batch {batch:3d}: {decode:8.1f} tok/s, {results['runs'][f'{kind}_b{batch}']}", flush=True)
        base, hetero = results["runs"][f"base_b{batch}"], results["runs"][f"hetero1_b{batch}"]
        results[f"hetero1_over_base_b{batch}"] = round(hetero["decode_tok_s"] / base["decode_tok_s"], 3)
    results["machine"] = machine()
    write_json(args.out, results)
    return results


def _weights(model: DecoderModel) -> list[torch.Tensor]:
    """Every tensor a decode step reads once (the embedding table only at the step's rows: not counted)."""
    tensors = [model.lm_head.weight, model.final_norm]
    for layer in model.layers:
        for value in vars(layer).values():  # its norms and projections
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, Linear):
                tensors += [t for t in (value.weight, value.bias) if t is not None]
    return tensors


if __name__ == "__main__":
    main()
