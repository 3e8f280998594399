"""What each composition predicts at a sequential composite's part boundary.

For every held-out prompt of the sequential composites, the gold first part is appended to the
answer and one forward asks for the next token, under: the base model, skill_a's adapter,
skill_b's, and both skills through a gate (`pair_gate`, and with --fusion-gate a fusion gate, whose
base column's share at that token is reported too). The separator ", " must come next; a library
adapter predicts its end token there. If the base model itself does not continue with the separator,
a base column cannot carry it, whatever the gate learns: that separates the gate's limit from the
base model's.

Then the whole gold answer, teacher-forced, in one forward per mode (`parts`): per part, the share
of answer tokens each mode predicts right, and for the gates the mean weight (over layers and the
part's tokens) on the part's own skill, on the other skill and on the base column. With the gold
first part and separator in the context, skill_b alone on the second part is the hand switch of
`eval --handoff`; a gate whose second part trails it either weighs the wrong adapter there (own
weight low) or mixes in what spoils it (other weight high): that separates the switch from the mix.

And the ceiling of any mix at the boundary (`mix_grid`): the two skills at fixed weights (w_a, w_b),
the same in every layer, over a grid; how often the separator comes next under the best single
pair, and under the best pair chosen per prompt. A gate weighs per layer too, but if no pair of
weights gives the separator, what stops the gate is the library's adapters, not its training.

    python -m bench.boundary_probe --fusion-gate DIR --out bench/results/boundary_probe.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from mole_serve.compose import build
from mole_serve.config import Settings
from mole_serve.training.evaluate import ALL_TASKS, chat_prompts, eval_set
from mole_serve.training.tasks import COMPOSITES
from mole_serve.training.train_adapter import answer_token_ids
from mole_serve.training.train_gate import part_adapters

from bench.common import write_json


def next_tokens(engine, ids: list[list[int]], sets: list[tuple[list[str], list[float]]], gate) -> tuple:
    """(argmax next token per sequence, gate stats or None): one forward over whole sequences."""
    rows = torch.tensor([sum(map(len, ids[: i + 1])) - 1 for i in range(len(ids))])
    out = engine.runner.prefill(ids, sets, rows, gate, keep_layer_weights=gate is not None)
    return out.logits.argmax(-1).tolist(), out.gate_stats, rows


PARTS = ("first", "separator", "second")
GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)  # each skill's weight at the boundary


def mix_grid(engine, ids: list[list[int]], skills: list[list[str]], comma: int) -> dict:
    """Separator-next rates over the (w_a, w_b) grid: the best pair's, and the best per prompt's."""
    hits = {}
    for w_a in GRID:
        for w_b in GRID:
            sets = [([a, b], [w_a, w_b]) for a, b in skills]
            predicted, _, _ = next_tokens(engine, ids, sets, None)
            hits[(w_a, w_b)] = [t == comma for t in predicted]
    best = max(hits, key=lambda k: sum(hits[k]))
    return {
        "grid": list(GRID),
        "best_pair": list(best),
        "best_pair_separator_next": round(sum(hits[best]) / len(ids), 3),
        "any_pair_separator_next": round(sum(map(any, zip(*hits.values()))) / len(ids), 3),
    }


def part_figures(engine, prompts, answers, firsts, sets, gate) -> dict:
    """Teacher-forced over each prompt's gold answer and end token: per part (first skill's tokens,
    the separator's, the second's with the end token) the share predicted right, and with a gate
    the mean weight on the part's own skill (the separator's: skill_b's), on the other skill and on
    the base column."""
    tok = engine.tokenizer
    labels = [part_adapters(tok, a, len(f), ("a", "b")) for a, f in zip(answers, firsts)]  # per answer token
    answer_ids = [answer_token_ids(tok, a) + [tok.eos_token_id] for a in answers]  # what the labels count
    ids = [p + a for p, a in zip(prompts, answer_ids)]
    offsets = [sum(map(len, ids[:i])) for i in range(len(ids))]
    rows = torch.tensor([o + len(p) - 1 + j for o, p, a in zip(offsets, prompts, answer_ids) for j in range(len(a))])
    out = engine.runner.prefill(ids, sets, rows, gate, keep_layer_weights=gate is not None)
    right = (out.logits.argmax(-1).cpu() == torch.tensor([t for a in answer_ids for t in a])).tolist()
    stats = out.gate_stats
    weights = torch.stack(stats.layer_weights).mean(0)[rows].cpu() if gate is not None else None  # [rows, C + 1]
    sums: dict[str, list[float]] = {p: [0.0] * 5 for p in PARTS}  # right, tokens, own, other skill's, base
    r = 0
    for i, part_labels in enumerate(labels):
        cols = [*stats.seq_columns[i], weights.shape[1] - 1] if weights is not None else None  # skill_a, skill_b, base
        for label in part_labels:
            part = {("a",): "first", ("b",): "second"}.get(label, "separator")
            acc = sums[part]
            acc[0] += right[r]
            acc[1] += 1
            if cols is not None:
                own, other = (cols[0], cols[1]) if part == "first" else (cols[1], cols[0])
                acc[2] += weights[r, own].item()
                acc[3] += weights[r, other].item()
                acc[4] += weights[r, cols[2]].item()
            r += 1
    figures = {}
    for part, (n_right, n, own, other, base) in sums.items():
        figures[f"{part}_right"] = round(n_right / n, 3)
        if weights is not None:
            figures[f"{part}_own_weight"] = round(own / n, 3)
            figures[f"{part}_other_weight"] = round(other / n, 3)
            figures[f"{part}_base_share"] = round(base / n, 3)
    return figures


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-task", type=int, default=30)
    ap.add_argument("--fusion-gate", type=Path, help="a fusion-form gate folder (train-gate --fusion)")
    ap.add_argument("--out", default="bench/results/boundary_probe.json")
    args = ap.parse_args(argv)

    built = build(Settings())
    engine = built.engine
    tok = engine.tokenizer
    sequential = sorted(n for n, c in COMPOSITES.items() if c.shape == "sequential")
    items = eval_set(sequential, args.per_task)
    prompts = chat_prompts(tok, items)
    firsts = [i.answer.rsplit(", ", 1)[0] for i in items]
    ids = [p + tok(f, add_special_tokens=False).input_ids for p, f in zip(prompts, firsts)]
    comma = tok(",", add_special_tokens=False).input_ids[0]
    eos = tok.eos_token_id
    skills = [list(ALL_TASKS[i.task].skills) for i in items]
    runs = {
        "base": ([([], [])] * len(items), None),
        "skill_a": ([([s[0]], [1.0]) for s in skills], None),
        "skill_b": ([([s[1]], [1.0]) for s in skills], None),
        "pair_gate": ([(s, [0.5, 0.5]) for s in skills], engine.pool.gate),
    }
    gates = [("pair_gate", engine.pool.gate)]
    if args.fusion_gate:
        built.load_gate(args.fusion_gate)
        runs["pair_gate_fusion"] = ([(s, [0.5, 0.5]) for s in skills], engine.pool.gate)
        gates.append(("pair_gate_fusion", engine.pool.gate))
    result: dict = {"per_task": args.per_task, "tasks": sequential, "separator_token": tok.decode([comma]), "modes": {}}
    with torch.inference_mode():
        for mode, (sets, gate) in runs.items():
            predicted, stats, rows = next_tokens(engine, ids, sets, gate)
            entry = {
                "separator_next": round(sum(t == comma for t in predicted) / len(items), 3),
                "end_next": round(sum(t == eos for t in predicted) / len(items), 3),
            }
            if stats is not None and stats.layer_weights:
                base_share = torch.stack(stats.layer_weights)[:, rows, -1].mean(0)  # [items]: the base column
                entry["base_column_share"] = round(base_share.mean().item(), 4)
            result["modes"][mode] = entry
            print(f"{mode:>18}: {entry}", flush=True)
        result["mix_grid"] = mix_grid(engine, ids, skills, comma)
        print(f"{'mix_grid':>18}: {result['mix_grid']}", flush=True)
        answers = [i.answer for i in items]
        result["parts"] = {}
        for mode, (sets, gate) in runs.items():
            result["parts"][mode] = part_figures(engine, prompts, answers, firsts, sets, gate)
            print(f"{mode:>18} parts: {result['parts'][mode]}", flush=True)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
