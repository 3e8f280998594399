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

`--composite` evaluates the composite tasks (one answer needs two library skills; no adapter trained
on them) in modes `base`, `skill_a` / `skill_b` (each needed adapter alone; `best_single` is the
better per task), `select` / `mixture` / `gate` through `auto` (with how often retrieval brings both
skills), `pair_gate` (the two named adapters under the gate: branch masking) and the static merges
`merge_linear` and `merge_ties` of the two. `--handoff` adds a diagnostic of the sequential
composites: the end token after the first part is replaced by the separator ", " and generation goes
on, under `handoff` (skill_a writes the first part, skill_b the rest: the switch made by hand, what
per-token routing at the separator could reach) and `pair_gate` (the router chooses throughout).

Two eval sets, reported apart (mole_serve/training/tasks.py has the splits): held-out phrasings (the
`eval` split: phrasing families and input formats no adapter trained on, on held-out inputs; the
headline) and held-out inputs (`eval_inputs`: the training phrasings on inputs never trained on).
"""

from __future__ import annotations

import argparse
import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from mole_serve.config import Settings
from mole_serve.input_forms import REWRITES, form_prompts
from mole_serve.library.store import adapter_dirs, read_card
from mole_serve.training.tasks import COMPOSITES, TASKS
from mole_serve.training.train_adapter import build_chat

# one adapter for every prompt, by name
BY_NAME = {"multitask_lora": "multitask-lora", "mixlora": "multitask-mixlora", "moelora": "multitask-moelora"}
MODES = ("base", "oracle", "select", "mixture", "gate", "router", *BY_NAME)
DEFAULT_MODES = MODES[:5]
RETRIEVAL_MODES = ("select", "mixture", "gate")
COMPOSITE_MODES = ("base", "skill_a", "skill_b", "select", "mixture", "gate", "pair_gate", "merge_linear", "merge_ties")
ALL_TASKS = {**TASKS, **COMPOSITES}
TIES_DENSITY = 0.5


@dataclass
class Item:
    task: str
    prompt: str
    answer: str
    split: str = "eval"
    intermediate: str = ""  # fused composites: the first skill's answer (Task.intermediate)


def eval_set(tasks: list[str], per_task: int, seed: int = 0, split: str = "eval") -> list[Item]:
    """per_task prompts from each task's `split`, shuffled together."""
    items = [
        Item(t, p, a, split, ALL_TASKS[t].intermediate(key) if ALL_TASKS[t].intermediate else "")
        for t in tasks
        for key, p, a in ALL_TASKS[t].draw(split, per_task, seed=seed)
    ]
    random.Random(seed).shuffle(items)
    return items


@dataclass
class Answer:
    text: str
    top_adapter: str | None  # retrieval's top-1 (select, mixture) or the gate's largest mean weight
    adapters: tuple[str, ...] = ()  # every adapter the request ran with


def top_adapter(report: list[dict]) -> str | None:
    if not report:
        return None
    key = "gate_weight" if "gate_weight" in report[0] else "score" if "score" in report[0] else "weight"
    return max(report, key=lambda a: a.get(key, 0))["name"]


def selection(mode: str, item: Item, library: set[str], top_k: int):
    """The adapters `mode` gives one item (None: the base model alone); `router` is resolved apart."""
    from mole_serve.routing.types import AdapterRef, MergeSpec, Selection

    skills = tuple(AdapterRef(s) for s in ALL_TASKS[item.task].skills)
    if mode == "oracle":
        return Selection("mixture", (AdapterRef(item.task),)) if item.task in library else None
    if mode in RETRIEVAL_MODES:
        return Selection(mode, query=item.prompt, top_k=top_k)
    if mode in BY_NAME:
        return Selection("mixture", (AdapterRef(BY_NAME[mode]),))
    if mode in ("skill_a", "skill_b"):
        return Selection("mixture", (skills[mode == "skill_b"],))
    if mode == "pair_gate":
        return Selection("gate", skills)
    if mode.startswith("merge_"):
        strategy = mode.removeprefix("merge_")
        return Selection("merge", skills, merge=MergeSpec(strategy, TIES_DENSITY if strategy == "ties" else 1.0))
    return None


def chat_prompts(tokenizer, items: list[Item]) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(
            build_chat(i.prompt), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for i in items
    ]


def engine_answers(engine, items: list[Item], mode: str, max_tokens: int, library: set[str]) -> list[Answer]:
    """All items in one continuous batch of the engine in this process."""
    from mole_serve.engine.request import SamplingParams
    from mole_serve.routing.types import AdapterRef, Selection

    tok = engine.tokenizer
    prompts = chat_prompts(tok, items)
    if mode == "router":  # retrieval's candidates named as the request's adapters, without weights
        hits = engine.selector.retriever.search(
            [i.prompt for i in items], engine.settings.retrieval_top_k, engine.settings.retrieval_floor
        )
        selections = [Selection("gate", tuple(AdapterRef(name) for name, _ in h)) if h else None for h in hits]
    else:
        selections = [selection(mode, i, library, engine.settings.retrieval_top_k) for i in items]
    # as the server sends them: each with its prompt in every input form, for the adapters that read one
    selections = [
        s and replace(s, prompts_by_form=form_prompts(tok, build_chat(i.prompt), set(REWRITES)))
        for s, i in zip(selections, items)
    ]
    seqs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens), selections=selections)
    return [answer_of(tok.decode(s.output_ids, skip_special_tokens=True), s.report()) for s in seqs]


def handoff_answers(engine, items: list[Item], mode: str, max_tokens: int, library: set[str]) -> list[Answer]:
    """Sequential composites with the end of the first part replaced by the separator: a first
    generation, then its tokens without the end token and ", " appended to the prompt, and a second.
    mode `handoff`: skill_a's adapter, then skill_b's; any other: that mode's adapters for both."""
    from mole_serve.engine.request import SamplingParams

    tok = engine.tokenizer
    separator = tok.encode(", ", add_special_tokens=False)

    def generate(prompts: list[list[int]], mode: str) -> list[list[int]]:
        selections = [selection(mode, i, library, engine.settings.retrieval_top_k) for i in items]
        seqs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens), selections=selections)
        return [[t for t in s.output_ids if t not in engine.eos_token_ids] for s in seqs]

    prompts = chat_prompts(tok, items)
    first = generate(prompts, "skill_a" if mode == "handoff" else mode)
    second = generate([p + f + separator for p, f in zip(prompts, first)], "skill_b" if mode == "handoff" else mode)
    return [Answer(tok.decode(f + separator + s, skip_special_tokens=True), None) for f, s in zip(first, second)]


def answer_of(text: str, report: list[dict]) -> Answer:
    return Answer(text, top_adapter(report), tuple(a["name"] for a in report))


def request_body(sel, base: str) -> tuple[str, dict]:
    """The OpenAI request (model, extra body) that asks the server for `sel`."""
    if sel is None:
        return base, {}
    if not sel.explicit:
        return "auto", {"composition": sel.composition}
    if len(sel.explicit) == 1 and sel.composition == "mixture":
        return sel.explicit[0].name, {}
    extra = {"composition": sel.composition, "adapters": [a.name for a in sel.explicit]}
    if sel.composition == "merge":
        extra["merge"] = {"strategy": sel.merge.strategy, "density": sel.merge.density}
    return "auto", extra


def server_answers(
    url: str, api_key: str | None, items: list[Item], mode: str, max_tokens: int, library: set[str]
) -> list[Answer]:
    """The same items against a running server, 16 requests in flight."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=api_key or "none")
    base = client.models.list().data[0].id  # the server lists the base model first

    def complete(item: Item, model: str, extra: dict, max_tokens: int):
        return client.chat.completions.create(
            model=model, messages=build_chat(item.prompt), max_tokens=max_tokens, temperature=0, extra_body=extra
        )

    def ask(item: Item) -> Answer:
        model, extra = request_body(selection(mode, item, library, 3), base)
        if mode == "router":  # the mixture's report lists retrieval's candidates, then they go by name
            found = complete(item, "auto", {"composition": "mixture"}, 1).model_extra.get("adapters") or []
            if found:
                model, extra = "auto", {"composition": "gate", "adapters": [a["name"] for a in found]}
        r = complete(item, model, extra, max_tokens)
        return answer_of(r.choices[0].message.content, r.model_extra.get("adapters") or [])

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(ask, items))


def per_task_accuracy(items: list[Item], preds: list[Answer]) -> dict[str, float]:
    """task -> exact-match share of its items."""
    hits: dict[str, list[bool]] = {}
    for item, pred in zip(items, preds):
        hits.setdefault(item.task, []).append(ALL_TASKS[item.task].score(pred.text, item.answer))
    return {t: sum(h) / len(h) for t, h in hits.items()}


def accuracy_table(
    items: list[Item], answers: dict[str, list[Answer]], library: set[str], adapter_tasks: dict[str, str] | None = None
) -> dict[str, dict]:
    """mode -> task -> exact-match accuracy, the in- and out-of-domain means (over tasks), and for
    the retrieval modes the in-domain share whose top adapter is the task's own (adapter_tasks:
    adapter -> the task its card names, so a task's MELoRA twin counts as its own too)."""
    adapter_tasks = adapter_tasks or {}
    table: dict[str, dict] = {}
    for mode, preds in answers.items():
        per_task = dict(sorted(per_task_accuracy(items, preds).items(), key=lambda tv: (tv[0] not in library, tv[0])))
        row: dict = dict(per_task)
        for domain, tasks in (
            ("in", [t for t in per_task if t in library]),
            ("out", [t for t in per_task if t not in library]),
        ):
            if tasks and not (mode == "oracle" and domain == "out"):
                row[f"mean_{domain}_domain"] = sum(per_task[t] for t in tasks) / len(tasks)
        if mode.removesuffix("_fewshot").removesuffix("_fusion") in (*RETRIEVAL_MODES, "router"):
            own = [
                adapter_tasks.get(p.top_adapter, p.top_adapter) == i.task
                for i, p in zip(items, preds)
                if i.task in library
            ]
            row["top1_is_own_adapter"] = sum(own) / len(own)
        if mode == "oracle":
            row = {t: v for t, v in row.items() if t in library or t.startswith("mean_in")}
        table[mode] = row
    return table


def composite_table(items: list[Item], answers: dict[str, list[Answer]]) -> dict[str, dict]:
    """mode -> composite task -> accuracy, and the mean over tasks; `best_single` is per task the
    better of the two skills alone; mixture and gate report the share of prompts whose retrieved
    candidates hold both skills (select runs the top-1 alone by design)."""
    table: dict[str, dict] = {}
    for mode, preds in answers.items():
        row: dict = dict(sorted(per_task_accuracy(items, preds).items()))
        row["mean"] = sum(row.values()) / len(row)
        if mode in ("mixture", "gate", "gate_fewshot", "gate_fusion"):
            both = [set(ALL_TASKS[i.task].skills) <= set(p.adapters) for i, p in zip(items, preds)]
            row["both_skills_retrieved"] = sum(both) / len(both)
        table[mode] = row
    return with_best_single(table)


def parts_table(items: list[Item], answers: dict[str, list[Answer]]) -> dict[str, dict]:
    """The sequential composites' partial credit (Task.parts_score) per mode and task, the mean,
    and `one_part_then_end`: the share of answers that are one skill's part alone, i.e. the
    generation ended where that skill's adapter learned to end."""
    table: dict[str, dict] = {}
    for mode, preds in answers.items():
        credit: dict[str, list[float]] = {}
        one_part = []
        for item, pred in zip(items, preds):
            task = ALL_TASKS[item.task]
            if task.shape == "sequential":
                credit.setdefault(item.task, []).append(task.parts_score(pred.text, item.answer))
                one_part.append(task.is_one_part(pred.text, item.answer))
        row: dict = {t: sum(c) / len(c) for t, c in sorted(credit.items())}
        row["mean"] = sum(row.values()) / len(row)
        row["one_part_then_end"] = sum(one_part) / len(one_part)
        table[mode] = row
    return with_best_single(table)


def handoff_table(items: list[Item], answers: dict[str, list[Answer]]) -> dict[str, dict]:
    """Exact match per sequential composite and mode, the mean, and the mean partial credit."""
    table: dict[str, dict] = {}
    for mode, preds in answers.items():
        row = dict(sorted(per_task_accuracy(items, preds).items()))
        credit = [ALL_TASKS[i.task].parts_score(p.text, i.answer) for i, p in zip(items, preds)]
        table[mode] = {**row, "mean": sum(row.values()) / len(row), "mean_half_per_part": sum(credit) / len(credit)}
    return table


def intermediate_table(items: list[Item], answers: dict[str, list[Answer]]) -> dict[str, dict]:
    """The fused composites: per mode and task, the share of answers that are the intermediate
    (the first skill's answer: the sum, the value, the reversed letters) instead of the composite's."""
    table: dict[str, dict] = {}
    for mode, preds in answers.items():
        hits: dict[str, list[bool]] = {}
        for item, pred in zip(items, preds):
            if item.intermediate:
                first_skill = TASKS[ALL_TASKS[item.task].skills[0]]
                hits.setdefault(item.task, []).append(first_skill.score(pred.text, item.intermediate))
        table[mode] = {t: sum(h) / len(h) for t, h in sorted(hits.items())}
    return table


def with_best_single(table: dict[str, dict]) -> dict[str, dict]:
    """The table with `best_single`: per task the better of skill_a and skill_b."""
    if "skill_a" in table and "skill_b" in table:
        tasks = [t for t in table["skill_a"] if t in ALL_TASKS]
        best = {t: max(table["skill_a"][t], table["skill_b"][t]) for t in tasks}
        table["best_single"] = {**best, "mean": sum(best.values()) / len(best)}
    return table


def markdown(table: dict[str, dict]) -> str:
    modes = list(table)
    rows = [f"| task | {' | '.join(modes)} |", "|---" * (len(modes) + 1) + "|"]
    keys = list(dict.fromkeys(k for m in modes for k in table[m]))
    for key in keys:
        rows.append(
            f"| {key} | " + " | ".join(f"{table[m][key]:.0%}" if key in table[m] else "-" for m in modes) + " |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mole-serve eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", help="evaluate a running server instead of the engine in this process")
    ap.add_argument("--api-key")
    ap.add_argument("--per-task", type=int, default=50, help="held-out-phrasing prompts per task")
    ap.add_argument(
        "--per-task-inputs", type=int, default=20, help="held-out-input prompts (training phrasings) per in-domain task"
    )
    ap.add_argument(
        "--modes",
        nargs="+",
        choices=sorted(set(MODES + COMPOSITE_MODES)),
        help=f"default: {' '.join(DEFAULT_MODES)}; with --composite: {' '.join(COMPOSITE_MODES)}",
    )
    ap.add_argument("--composite", action="store_true", help="the composite tasks (two skills per answer)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--no-out-of-domain",
        dest="out_of_domain",
        action="store_false",
        help="skip the tasks without an adapter in the library",
    )
    ap.add_argument(
        "--out",
        help="markdown table, JSON beside it (default bench/results/eval.md, or eval_composite.md with --composite)",
    )
    ap.add_argument(
        "--fewshot-gate",
        type=Path,
        help="in-process: then run the gate modes again with this gate "
        "(`mole-serve train-gate --composite-per-task N --out DIR`), as gate_fewshot, pair_gate_fewshot",
    )
    ap.add_argument(
        "--fusion-gate",
        type=Path,
        help="in-process: then run the gate modes again with this fusion-form gate "
        "(`mole-serve train-gate --fusion --part-routing --composite-per-task N --out DIR`), as gate_fusion, "
        "pair_gate_fusion",
    )
    ap.add_argument(
        "--handoff",
        action="store_true",
        help="in-process, with --composite: the sequential "
        "composites again with the first part's end token replaced by ', ' (modes handoff, pair_gate)",
    )
    ap.add_argument(
        "--extra-adapters",
        type=Path,
        help="in-process: a folder of adapter folders to add beside the store's (the multitask_lora baseline, "
        "trained with `mole-serve train-adapter --task multitask --kind lora --out <folder>`)",
    )
    args = ap.parse_args(argv)
    if args.extra_adapters and not args.extra_adapters.is_dir():
        ap.error(f"--extra-adapters {args.extra_adapters} is not a folder")
    modes = args.modes or list(COMPOSITE_MODES if args.composite else DEFAULT_MODES)
    if (args.fewshot_gate or args.fusion_gate or args.handoff) and args.url:
        ap.error(
            "--fewshot-gate, --fusion-gate and --handoff run in-process: a server serves its own gate and ends "
            "its answers"
        )
    if args.handoff and not args.composite:
        ap.error("--handoff is a diagnostic of the composite tasks: add --composite")
    out = Path(args.out or f"bench/results/{'eval_composite' if args.composite else 'eval'}.md")

    settings = Settings()
    library = {t for t in adapter_dirs(settings.adapters_dir) if t in TASKS}
    needed = {s for c in COMPOSITES.values() for s in c.skills} if args.composite else set()
    if not library or not needed <= library:
        ap.error(f"the task adapters {sorted(needed) or ''} are not all in {settings.adapters_dir}")
    if args.composite:
        items = eval_set(sorted(COMPOSITES), args.per_task)
    else:
        items = eval_set(
            sorted(library) + (sorted(set(TASKS) - library) if args.out_of_domain else []), args.per_task
        ) + eval_set(sorted(library), args.per_task_inputs, split="eval_inputs")
    if args.url:

        def answer(mode: str) -> list[Answer]:
            return server_answers(args.url, args.api_key, items, mode, args.max_tokens, library)
    else:
        from mole_serve.compose import build

        built = build(settings)
        engine = built.engine
        for name, folder in adapter_dirs(args.extra_adapters).items() if args.extra_adapters else ():
            if name not in built.catalog:
                built.add_adapter(name, folder)
        missing = [BY_NAME[m] for m in modes if m in BY_NAME and BY_NAME[m] not in built.catalog]
        if missing:
            ap.error(f"modes {', '.join(missing)} need those adapters: in the store or under --extra-adapters")

        def answer(mode: str) -> list[Answer]:
            return engine_answers(engine, items, mode, args.max_tokens, library)

    answers = {mode: answer(mode) for mode in modes}
    sequential = [i for i in items if ALL_TASKS[i.task].shape == "sequential"]
    handoffs = (
        {mode: handoff_answers(engine, sequential, mode, args.max_tokens, library) for mode in ("handoff", "pair_gate")}
        if args.handoff
        else {}
    )
    for suffix, folder in (("fewshot", args.fewshot_gate), ("fusion", args.fusion_gate)):
        if folder:
            built.load_gate(folder)
            for mode in [m for m in ("gate", "pair_gate") if m in modes]:
                answers[f"{mode}_{suffix}"] = answer(mode)
            if args.handoff:
                handoffs[f"pair_gate_{suffix}"] = handoff_answers(
                    engine, sequential, "pair_gate", args.max_tokens, library
                )
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.composite:
        table, parts, middle = (
            composite_table(items, answers),
            parts_table(items, answers),
            intermediate_table(items, answers),
        )
        text = (
            f"Composite tasks, {args.per_task} held-out prompts each (held-out phrasings and inputs), exact "
            f"match, greedy; no adapter trained on them.\n\n{markdown(table)}\n\nSequential composites, "
            f"partial credit (half per part, each scored as its skill scores it):\n\n{markdown(parts)}\n\n"
            f"Fused composites, answers that are the intermediate (the first skill's answer):\n\n"
            f"{markdown(middle)}"
        )
        payload = {
            "per_task": args.per_task,
            "accuracy": table,
            "parts_credit": parts,
            "intermediate": middle,
            "skills": {c.name: [*c.skills, c.shape] for c in COMPOSITES.values()},
        }
        if handoffs:
            payload["handoff"] = handoff_table(sequential, handoffs)
            text += (
                "\n\nDiagnostic (`--handoff`): the sequential composites with the end token after the first "
                'part replaced by the separator ", " and generation going on; `handoff` = skill_a\'s adapter '
                "for the first part, skill_b's after the separator (the switch made by hand); the others "
                f"choose throughout. Exact match:\n\n{markdown(payload['handoff'])}"
            )
    else:
        adapter_tasks = {n: read_card(path).get("task") for n, path in adapter_dirs(settings.adapters_dir).items()}
        tables = {}
        for split in ("eval", "eval_inputs"):
            keep = [n for n, item in enumerate(items) if item.split == split]
            tables[split] = accuracy_table(
                [items[n] for n in keep], {m: [a[n] for n in keep] for m, a in answers.items()}, library, adapter_tasks
            )
        text = (
            f"Exact match, greedy. In-domain tasks have an adapter in the library, out-of-domain tasks have "
            f"none.\n\nHeld-out phrasings ({args.per_task} prompts per task: phrasing families and input "
            f"formats no adapter trained on, held-out inputs):\n\n{markdown(tables['eval'])}\n\n"
            f"Held-out inputs ({args.per_task_inputs} prompts per in-domain task, training phrasings):\n\n"
            f"{markdown(tables['eval_inputs'])}"
        )
        payload = {
            "per_task": args.per_task,
            "per_task_inputs": args.per_task_inputs,
            "accuracy": tables["eval"],
            "accuracy_held_out_inputs": tables["eval_inputs"],
        }
    print(text)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0
