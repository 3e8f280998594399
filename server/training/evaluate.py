"""Task accuracy of the shipped library under each composition mode, on one mixed eval set.

    mole-serve eval                         # through the engine in this process, in batch
    mole-serve eval --url http://127.0.0.1:8000   # against a running server

Modes: `base` (no adapter), `oracle` (each prompt on its own task's adapter), the one-adapter-for-
all-tasks rows by name (`multitask_lora`, `mixlora`, `moelora`: the adapters `multitask-lora`,
`multitask-mixlora`, `multitask-moelora`, trained on the mixture of the library's tasks by
`mole-serve train-adapter --task multitask`; in-process, folders under --extra-adapters are added
beside the store's), and model `auto`
with composition `select` (top-1 retrieved), `mixture` (retrieval-score weights) or `gate` (the
trained router). Not run by default: `router`, the gate over the same retrieved candidates named as
`adapters` without weights, so its prior is uniform and the router alone chooses. In-domain tasks
have an adapter in the library; out-of-domain tasks have none, so there retrieval can only bring
neighbours. Also reported: how often retrieval's top-1 (and the gate's largest mean weight) is the
prompt's own task adapter.

Two eval sets, reported apart (server/training/tasks.py has the splits): held-out phrasings (the
`eval` split: phrasing families and input formats no adapter trained on, on held-out inputs; the
headline) and held-out inputs (`eval_inputs`: the training phrasings on inputs never trained on).
"""

from __future__ import annotations

import argparse
import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from server.config import Settings
from server.library.store import adapter_dirs, read_card
from server.training.tasks import TASKS
from server.training.train_adapter import build_chat

# one adapter for every prompt, by name
BY_NAME = {"multitask_lora": "multitask-lora", "mixlora": "multitask-mixlora", "moelora": "multitask-moelora"}
MODES = ("base", "oracle", "select", "mixture", "gate", "router", *BY_NAME)
DEFAULT_MODES = MODES[:5]
RETRIEVAL_MODES = ("select", "mixture", "gate")


@dataclass
class Item:
    task: str
    prompt: str
    answer: str
    split: str = "eval"


def eval_set(tasks: list[str], per_task: int, seed: int = 0, split: str = "eval") -> list[Item]:
    """per_task prompts from each task's `split`, shuffled together."""
    items = [Item(t, p, a, split) for t in tasks for p, a in TASKS[t].examples(split, per_task, seed=seed)]
    random.Random(seed).shuffle(items)
    return items


@dataclass
class Answer:
    text: str
    top_adapter: str | None  # retrieval's top-1 (select, mixture) or the gate's largest mean weight


def top_adapter(report: list[dict]) -> str | None:
    if not report:
        return None
    key = "gate_weight" if "gate_weight" in report[0] else "score" if "score" in report[0] else "weight"
    return max(report, key=lambda a: a.get(key, 0))["name"]


def engine_answers(engine, items: list[Item], mode: str, max_tokens: int, library: set[str]) -> list[Answer]:
    """All items in one continuous batch of the engine in this process."""
    from server.engine.request import SamplingParams
    from server.routing.types import AdapterRef, Selection

    tok = engine.tokenizer
    prompts = [tok.apply_chat_template(build_chat(i.prompt), add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for i in items]

    def selection(item: Item) -> Selection | None:
        if mode == "oracle":
            return Selection("mixture", (AdapterRef(item.task),)) if item.task in library else None
        if mode in RETRIEVAL_MODES:
            return Selection(mode, query=item.prompt, top_k=engine.settings.retrieval_top_k)
        if mode in BY_NAME:
            return Selection("mixture", (AdapterRef(BY_NAME[mode]),))
        return None

    if mode == "router":  # retrieval's candidates named as the request's adapters, without weights
        hits = engine.catalog.retriever.search([i.prompt for i in items], engine.settings.retrieval_top_k,
                                       engine.settings.retrieval_floor)
        selections = [Selection("gate", tuple(AdapterRef(name) for name, _ in h)) if h else None for h in hits]
    else:
        selections = [selection(i) for i in items]
    seqs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens), selections=selections)
    return [Answer(tok.decode(s.output_ids, skip_special_tokens=True), top_adapter(s.report()))
            for s in seqs]


def server_answers(url: str, api_key: str | None, items: list[Item], mode: str, max_tokens: int,
                   library: set[str]) -> list[Answer]:
    """The same items against a running server, 16 requests in flight."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=api_key or "none")
    base = client.models.list().data[0].id  # the server lists the base model first

    def complete(item: Item, model: str, extra: dict, max_tokens: int):
        return client.chat.completions.create(model=model, messages=build_chat(item.prompt), max_tokens=max_tokens,
                                              temperature=0, extra_body=extra)

    def ask(item: Item) -> Answer:
        model = ("auto" if mode in RETRIEVAL_MODES else item.task if mode == "oracle" and item.task in library
                 else BY_NAME.get(mode, base))
        extra = {"composition": mode} if mode in RETRIEVAL_MODES else {}
        if mode == "router":  # the mixture's report lists retrieval's candidates, then they go by name
            found = complete(item, "auto", {"composition": "mixture"}, 1).model_extra.get("adapters") or []
            if found:
                model, extra = "auto", {"composition": "gate", "adapters": [a["name"] for a in found]}
        r = complete(item, model, extra, max_tokens)
        return Answer(r.choices[0].message.content, top_adapter(r.model_extra.get("adapters") or []))

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(ask, items))


def accuracy_table(items: list[Item], answers: dict[str, list[Answer]], library: set[str],
                   adapter_tasks: dict[str, str] | None = None) -> dict[str, dict]:
    """mode -> task -> exact-match accuracy, the in- and out-of-domain means (over tasks), and for
    the retrieval modes the in-domain share whose top adapter is the task's own (adapter_tasks:
    adapter -> the task its card names, so a task's MELoRA twin counts as its own too)."""
    adapter_tasks = adapter_tasks or {}
    table: dict[str, dict] = {}
    for mode, preds in answers.items():
        hits: dict[str, list[bool]] = {}
        for item, pred in zip(items, preds):
            hits.setdefault(item.task, []).append(TASKS[item.task].score(pred.text, item.answer))
        per_task = {t: sum(h) / len(h) for t, h in sorted(hits.items(), key=lambda th: (th[0] not in library, th[0]))}
        row: dict = dict(per_task)
        for domain, tasks in (("in", [t for t in per_task if t in library]), ("out", [t for t in per_task
                                                                                       if t not in library])):
            if tasks and not (mode == "oracle" and domain == "out"):
                row[f"mean_{domain}_domain"] = sum(per_task[t] for t in tasks) / len(tasks)
        if mode in (*RETRIEVAL_MODES, "router"):
            own = [adapter_tasks.get(p.top_adapter, p.top_adapter) == i.task for i, p in zip(items, preds)
                   if i.task in library]
            row["top1_is_own_adapter"] = sum(own) / len(own)
        if mode == "oracle":
            row = {t: v for t, v in row.items() if t in library or t.startswith("mean_in")}
        table[mode] = row
    return table


def markdown(table: dict[str, dict]) -> str:
    modes = list(table)
    rows = [f"| task | {' | '.join(modes)} |", "|---" * (len(modes) + 1) + "|"]
    keys = list(dict.fromkeys(k for m in modes for k in table[m]))
    for key in keys:
        rows.append(f"| {key} | " + " | ".join(f"{table[m][key]:.0%}" if key in table[m] else "-" for m in modes)
                    + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mole-serve eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="evaluate a running server instead of the engine in this process")
    ap.add_argument("--api-key")
    ap.add_argument("--per-task", type=int, default=50, help="held-out-phrasing prompts per task")
    ap.add_argument("--per-task-inputs", type=int, default=20,
                    help="held-out-input prompts (training phrasings) per in-domain task")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--no-out-of-domain", dest="out_of_domain", action="store_false",
                    help="skip the tasks without an adapter in the library")
    ap.add_argument("--out", default="bench/results/eval.md", help="markdown table; JSON is written beside it")
    ap.add_argument("--extra-adapters", type=Path, default=Path("bench/results/multitask"),
                    help="in-process: adapter folders to add beside the store's (the multitask_lora baseline)")
    args = ap.parse_args(argv)

    settings = Settings()
    library = {t for t in adapter_dirs(settings.adapters_dir) if t in TASKS}
    if not library:
        ap.error(f"no task adapters in {settings.adapters_dir}")
    items = (eval_set(sorted(library) + (sorted(set(TASKS) - library) if args.out_of_domain else []), args.per_task)
             + eval_set(sorted(library), args.per_task_inputs, split="eval_inputs"))
    if args.url:
        def answer(mode: str) -> list[Answer]:
            return server_answers(args.url, args.api_key, items, mode, args.max_tokens, library)
    else:
        from server.engine.engine import LLMEngine

        engine = LLMEngine.from_store(settings)
        for name, folder in adapter_dirs(args.extra_adapters).items() if args.extra_adapters.is_dir() else ():
            if name not in engine.catalog:
                engine.add_adapter(name, folder)

        def answer(mode: str) -> list[Answer]:
            return engine_answers(engine, items, mode, args.max_tokens, library)

    adapter_tasks = {name: read_card(path).get("task") for name, path in adapter_dirs(settings.adapters_dir).items()}
    answers = {mode: answer(mode) for mode in args.modes}
    tables = {}
    for split in ("eval", "eval_inputs"):
        keep = [n for n, item in enumerate(items) if item.split == split]
        tables[split] = accuracy_table([items[n] for n in keep], {m: [a[n] for n in keep] for m, a in answers.items()},
                                       library, adapter_tasks)
    text = (f"Held-out phrasings ({args.per_task} prompts per task: phrasing families and input formats no "
            f"adapter trained on, held-out inputs):\n\n{markdown(tables['eval'])}\n\n"
            f"Held-out inputs ({args.per_task_inputs} prompts per in-domain task, training phrasings):\n\n"
            f"{markdown(tables['eval_inputs'])}")
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"Exact match, greedy. In-domain tasks have an adapter in the library, out-of-domain tasks have "
                   f"none.\n\n{text}\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"per_task": args.per_task, "per_task_inputs": args.per_task_inputs, "accuracy": tables["eval"],
         "accuracy_held_out_inputs": tables["eval_inputs"]}, indent=2) + "\n")
    return 0
