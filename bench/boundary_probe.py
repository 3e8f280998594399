"""What each composition predicts at a sequential composite's part boundary.

For every held-out prompt of the sequential composites, the gold first part is appended to the
answer and one forward asks for the next token, under: the base model, skill_a's adapter,
skill_b's, and both skills through a gate (`pair_gate`, and with --fusion-gate a fusion gate, whose
base column's share at that token is reported too). The separator ", " must come next; a library
adapter predicts its end token there. If the base model itself does not continue with the separator,
a base column cannot carry it, whatever the gate learns: that separates the gate's limit from the
base model's.

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

from bench.common import write_json


def next_tokens(engine, ids: list[list[int]], sets: list[tuple[list[str], list[float]]], gate) -> tuple:
    """(argmax next token per sequence, gate stats or None): one forward over whole sequences."""
    rows = torch.tensor([sum(map(len, ids[: i + 1])) - 1 for i in range(len(ids))])
    out = engine.runner.prefill(ids, sets, rows, gate, keep_layer_weights=gate is not None)
    return out.logits.argmax(-1).tolist(), out.gate_stats, rows


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
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
