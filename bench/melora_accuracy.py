"""MELoRA against LoRA on the library's hardest tasks: the shipped rank-8 LoRA, a MELoRA of 8 mini
LoRAs of rank 1 (1/8 of its parameters, the same equivalent rank 8), and a rank-1 LoRA (the
MELoRA's parameter count). Accuracy is exact match on each task's 64 held-out eval prompts, twice:
as measured at training time (transformers with the training modules) and as served by this engine
by name (the same prompts, greedy): the two agree when serving is exact.

    python -m bench.melora_accuracy --trained /tmp/seeds --out bench/results/melora.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mole_serve.compose import build
from mole_serve.config import Settings
from mole_serve.engine.engine import LLMEngine
from mole_serve.engine.request import SamplingParams
from mole_serve.routing.types import AdapterRef
from mole_serve.training.tasks import TASKS
from mole_serve.training.train_adapter import TrainOptions, build_chat

from bench.common import machine, write_json

VARIANTS = {"lora8": "", "melora": "-melora", "lora1": "-lora1"}  # folder suffix of each variant


def served_accuracy(engine: LLMEngine, name: str, task: str, n_eval: int) -> float:
    pairs = TASKS[task].examples("eval", n_eval, seed=0)  # the set train-adapter evaluates on
    tok = engine.tokenizer
    prompts = [
        tok.apply_chat_template(build_chat(p), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for p, _ in pairs
    ]
    seqs = engine.generate(
        prompts, SamplingParams(max_tokens=TASKS[task].max_new_tokens), [(AdapterRef(name),)] * len(prompts)
    )
    answers = [tok.decode(s.output_ids, skip_special_tokens=True) for s in seqs]
    return sum(TASKS[task].score(a, ans) for a, (_, ans) in zip(answers, pairs)) / len(pairs)


def trainable_params(engine: LLMEngine, name: str) -> int:
    """Parameters in the adapter's files (what was trained)."""
    from mole_serve.library.catalog import read_tensors

    return sum(t.numel() for t in read_tensors(engine.adapters.folder(name), name).values())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trained", type=Path, required=True, help="folder with <task>-melora and <task>-lora1")
    ap.add_argument("--tasks", nargs="+", default=["add_3digit", "caesar_shift", "time_24h_to_12h", "number_to_words"])
    ap.add_argument("--out", default="bench/results/melora.json")
    args = ap.parse_args(argv)
    settings = Settings()
    built = build(settings, retrieval=False, load_store=False)
    engine = built.engine
    rows: dict[str, dict] = {}
    for task in args.tasks:
        rows[task] = {}
        for variant, suffix in VARIANTS.items():
            folder = (Path(settings.adapters_dir) if variant == "lora8" else args.trained) / f"{task}{suffix}"
            name = f"{task}{suffix}" if suffix else task
            card = json.loads((folder / "card.json").read_text())
            built.add_adapter(name, folder)
            rows[task][variant] = {
                "params": trainable_params(engine, name),
                "accuracy_at_training": card["adapter_accuracy"],
                "accuracy_served": served_accuracy(engine, name, task, card.get("n_eval", TrainOptions().n_eval)),
                "steps": card["steps"],
                "config": {k: card["training"].get(k) for k in ("kind", "rank", "blocks", "alpha", "lr")},
            }
            print(task, variant, rows[task][variant], flush=True)
    summary = {
        v: {
            "mean_accuracy_served": round(sum(rows[t][v]["accuracy_served"] for t in rows) / len(rows), 4),
            "params_over_lora8": round(rows[args.tasks[0]][v]["params"] / rows[args.tasks[0]]["lora8"]["params"], 4),
        }
        for v in VARIANTS
    }
    print("\n| task | " + " | ".join(f"{v} acc (params)" for v in VARIANTS) + " |")
    print("|---" * (len(VARIANTS) + 1) + "|")
    for task, r in rows.items():
        print(
            f"| {task} | " + " | ".join(f"{r[v]['accuracy_served']:.1%} ({r[v]['params']:,})" for v in VARIANTS) + " |"
        )
    results = {"tasks": rows, "summary": summary, "machine": machine()}
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
