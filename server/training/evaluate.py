"""Task accuracy of the shipped library under each composition mode, on one mixed eval set.

    mole-serve eval                         # through the engine in this process, in batch
    mole-serve eval --url http://127.0.0.1:8000   # against a running server

Modes now: `base` (no adapter) and `oracle` (each prompt on its own task's adapter). The
retrieval modes (select / mixture / gate, in- and out-of-domain) join when retrieval lands.
"""

from __future__ import annotations

import argparse
import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from server.config import Settings
from server.lora.store import adapter_dirs
from server.training.tasks import TASKS
from server.training.train_adapter import build_chat

MODES = ("base", "oracle")


@dataclass
class Item:
    task: str
    prompt: str
    answer: str


def eval_set(tasks: list[str], per_task: int, seed: int = 0) -> list[Item]:
    """per_task prompts from each task's eval split, shuffled together."""
    items = [Item(t, p, a) for t in tasks for p, a in TASKS[t].examples("eval", per_task, seed=seed)]
    random.Random(seed).shuffle(items)
    return items


def adapter_for(item: Item, mode: str) -> str | None:
    return item.task if mode == "oracle" else None


def engine_answers(engine, items: list[Item], mode: str, max_tokens: int) -> list[str]:
    """All items in one continuous batch of the engine in this process."""
    from server.engine.request import AdapterRef, SamplingParams

    tok = engine.tokenizer
    prompts = [tok.apply_chat_template(build_chat(i.prompt), add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for i in items]
    sets = [(AdapterRef(a),) if (a := adapter_for(i, mode)) else () for i in items]
    seqs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens), sets)
    return [tok.decode(s.output_ids, skip_special_tokens=True) for s in seqs]


def server_answers(url: str, api_key: str | None, items: list[Item], mode: str, max_tokens: int) -> list[str]:
    """The same items against a running server, 16 requests in flight."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=api_key or "none")
    base = client.models.list().data[0].id  # the server lists the base model first

    def ask(item: Item) -> str:
        r = client.chat.completions.create(model=adapter_for(item, mode) or base, messages=build_chat(item.prompt),
                                           max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(ask, items))


def accuracy_table(items: list[Item], answers: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """mode -> task -> exact-match accuracy, plus `mean` (over tasks)."""
    table: dict[str, dict[str, float]] = {}
    for mode, preds in answers.items():
        hits: dict[str, list[bool]] = {}
        for item, pred in zip(items, preds):
            hits.setdefault(item.task, []).append(TASKS[item.task].score(pred, item.answer))
        per_task = {t: sum(h) / len(h) for t, h in sorted(hits.items())}
        table[mode] = {**per_task, "mean": sum(per_task.values()) / len(per_task)}
    return table


def markdown(table: dict[str, dict[str, float]]) -> str:
    modes = list(table)
    rows = [f"| task | {' | '.join(modes)} |", "|---" * (len(modes) + 1) + "|"]
    for task in table[modes[0]]:
        rows.append(f"| {task} | " + " | ".join(f"{table[m][task]:.0%}" for m in modes) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mole-serve eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="evaluate a running server instead of the engine in this process")
    ap.add_argument("--api-key")
    ap.add_argument("--per-task", type=int, default=50)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="bench/results/eval.md", help="markdown table; JSON is written beside it")
    args = ap.parse_args(argv)

    settings = Settings()
    tasks = [t for t in adapter_dirs(settings.adapters_dir) if t in TASKS]
    if not tasks:
        ap.error(f"no task adapters in {settings.adapters_dir}")
    items = eval_set(tasks, args.per_task)
    if args.url:
        def answer(mode: str) -> list[str]:
            return server_answers(args.url, args.api_key, items, mode, args.max_tokens)
    else:
        from server.__main__ import load_engine

        engine = load_engine(settings)

        def answer(mode: str) -> list[str]:
            return engine_answers(engine, items, mode, args.max_tokens)

    table = accuracy_table(items, {mode: answer(mode) for mode in args.modes})
    text = markdown(table)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"Exact match, {args.per_task} eval prompts per task, greedy.\n\n{text}\n")
    out.with_suffix(".json").write_text(json.dumps({"per_task": args.per_task, "accuracy": table}, indent=2) + "\n")
    return 0
